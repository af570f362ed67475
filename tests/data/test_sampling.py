from __future__ import annotations

import random

from lightning_peft import EpochSeededSampler


def padded_tokens(order: list[int], lengths: list[int], batch_size: int) -> int:
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(max(lengths[i] for i in b) * len(b) for b in batches)


def test_grouping_cuts_padding_and_visits_every_index():
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(2000)]
    grouped = list(EpochSeededSampler(lengths, 32, group_by_length=True, seed=1))
    shuffled = list(EpochSeededSampler(lengths, 32, group_by_length=False, seed=1))
    assert sorted(grouped) == list(range(2000)) and sorted(shuffled) == list(range(2000))
    assert padded_tokens(grouped, lengths, 32) < 0.7 * padded_tokens(shuffled, lengths, 32)


def test_order_depends_only_on_seed_and_epoch():
    lengths = list(range(1, 200))
    a, b = EpochSeededSampler(lengths, 8, seed=3), EpochSeededSampler(lengths, 8, seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
