from __future__ import annotations

import random

from lightning_peft import EpochSeededSampler


def padded_tokens(order: list[int], lengths: list[int], batch_size: int) -> int:
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(max(lengths[i] for i in b) * len(b) for b in batches)


def test_grouping_cuts_padding_and_visits_every_index():
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(2000)]
    grouped = list(EpochSeededSampler(lengths, 32, group_by_length=True, window=None, seed=1))
    windowed = list(EpochSeededSampler(lengths, 32, group_by_length=True, window=2, seed=1))
    shuffled = list(EpochSeededSampler(lengths, 32, group_by_length=False, seed=1))
    assert sorted(grouped) == sorted(windowed) == sorted(shuffled) == list(range(2000))
    full, half, none = (padded_tokens(order, lengths, 32) for order in (grouped, windowed, shuffled))
    assert full < half < 0.8 * none


def test_order_depends_only_on_seed_and_epoch():
    lengths = list(range(1, 200))
    a, b = EpochSeededSampler(lengths, 8, seed=3), EpochSeededSampler(lengths, 8, seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)


def test_grouped_batches_align_with_the_loader_and_have_no_length_curriculum():
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(1000)]
    order = list(EpochSeededSampler(lengths, 32, group_by_length=True, window=None, seed=5))
    batches = [order[i : i + 32] for i in range(0, len(order), 32)]
    assert len(batches[-1]) == 1000 % 32
    spans = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert max(spans) <= 3, "each batch holds examples of (nearly) one length"
    maxima = [max(lengths[i] for i in b) for b in batches[:-1]]
    assert maxima[0] != max(maxima), "no longest-first batch (it damps Adam for the whole run)"
    descents = sum(a > b for a, b in zip(maxima, maxima[1:], strict=False))
    assert 0.3 < descents / len(maxima) < 0.7, "batch order is shuffled, not swept long to short"


def test_windowed_batches_come_from_pairs_of_random_batches():
    lengths = list(range(1, 257))
    order = list(EpochSeededSampler(lengths, 8, window=2, seed=0))
    assert sorted(order) == list(range(256))
    batches = [order[i : i + 8] for i in range(0, 256, 8)]
    assert all(sorted(b, key=lengths.__getitem__, reverse=True) == b for b in batches), "sorted inside a batch"


def test_empty_sampler():
    assert list(EpochSeededSampler([], 4)) == []
