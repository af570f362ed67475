from __future__ import annotations

import random

import pytest
import torch
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

from lightning_peft.metrics import Entity, EntityF1, extract_entities, iob1_to_iob2

TYPES = ["PER", "LOC", "ORG"]
IOB_TAGS = ["O"] + [f"{p}-{t}" for t in TYPES for p in "BI"]
BIOES_TAGS = ["O"] + [f"{p}-{t}" for t in TYPES for p in "BIES"]


def random_sequences(rng: random.Random, tags: list[str], n: int) -> list[list[str]]:
    return [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(n)]


def perturb(rng: random.Random, gold: list[list[str]], tags: list[str]) -> list[list[str]]:
    return [[t if rng.random() < 0.7 else rng.choice(tags) for t in row] for row in gold]


@pytest.mark.parametrize("tags", [IOB_TAGS, BIOES_TAGS], ids=["iob", "bioes"])
@pytest.mark.parametrize("seed", range(6))
def test_matches_seqeval_on_random_and_ill_formed_sequences(tags, seed):
    rng = random.Random(seed)
    gold = random_sequences(rng, tags, 200)  # random tags: plenty of I- after O and type switches
    predicted = perturb(rng, gold, tags)
    metric = EntityF1(tags, per_type=True)
    for start in range(0, 200, 32):  # several updates, like batches
        metric.update(predicted[start : start + 32], gold[start : start + 32])
    result = metric.compute()
    assert result["f1"].item() == pytest.approx(f1_score(gold, predicted), abs=1e-6)
    assert result["precision"].item() == pytest.approx(precision_score(gold, predicted), abs=1e-6)
    assert result["recall"].item() == pytest.approx(recall_score(gold, predicted), abs=1e-6)
    report = classification_report(gold, predicted, output_dict=True, zero_division=0)
    for entity_type in TYPES:
        assert result[f"f1_{entity_type}"].item() == pytest.approx(report[entity_type]["f1-score"], abs=1e-6)


def test_entities_match_seqeval_get_entities():
    from seqeval.metrics.sequence_labeling import get_entities

    rng = random.Random(1)
    for row in random_sequences(rng, BIOES_TAGS, 300):
        assert extract_entities(row) == [Entity(*e) for e in get_entities(row)]


def test_hand_made_example():
    metric = EntityF1(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    metric.update([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "O"]])
    result = metric.compute()
    assert result["precision"].item() == pytest.approx(0.5)
    assert result["recall"].item() == pytest.approx(1.0)
    assert result["f1"].item() == pytest.approx(2 / 3)


def test_no_predictions_gives_zero_not_nan():
    metric = EntityF1(["O", "B-PER", "I-PER"])
    metric.update([["O", "O"]], [["B-PER", "O"]])
    assert metric.compute()["f1"].item() == 0.0


def test_states_sum_like_ddp():
    tags = IOB_TAGS
    rng = random.Random(3)
    gold = random_sequences(rng, tags, 64)
    predicted = perturb(rng, gold, tags)
    whole, a, b = EntityF1(tags), EntityF1(tags), EntityF1(tags)
    whole.update(predicted, gold)
    a.update(predicted[:20], gold[:20])
    b.update(predicted[20:], gold[20:])
    merged = EntityF1(tags)
    for name in ("true_positives", "predicted", "gold"):
        setattr(merged, name, getattr(a, name) + getattr(b, name))  # what dist_reduce_fx="sum" does
    torch.testing.assert_close(merged.compute()["f1"], whole.compute()["f1"])


def test_iob1_to_iob2():
    assert iob1_to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]) == [
        "B-PER", "I-PER", "O", "B-LOC", "B-LOC", "B-ORG",
    ]
