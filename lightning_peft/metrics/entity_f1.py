"""``EntityF1``: entity-level precision / recall / F1 as a DDP-synchronised torchmetrics ``Metric``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from lightning_peft.metrics.entities import extract_entities, split_tag


def entity_types(labels: Sequence[str]) -> list[str]:
    """Entity types named by a tag set, sorted: ``["B-PER", "I-PER", "O"]`` → ``["PER"]``."""
    return sorted({split_tag(label)[1] for label in labels} - {""})


class EntityF1(Metric):
    """Micro precision, recall and F1 over exact entity matches (type, start, end), plus F1 per type.

    Matches seqeval's default mode (conlleval chunking). States are per-type counts summed across processes,
    so the result under DDP equals the single-process one.

    Args:
        labels: the tag set (e.g. ``["O", "B-PER", "I-PER"]``); entity types are derived from it.
        per_type: also return ``f1_<TYPE>`` for each type.

    Example::

        metric = EntityF1(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
        metric.update([["B-PER", "I-PER", "O"]], [["B-PER", "I-PER", "B-LOC"]])
        metric.compute()["f1"]  # tensor(0.6667)
    """

    full_state_update = False

    def __init__(self, labels: Sequence[str], per_type: bool = False) -> None:
        super().__init__()
        self.types = entity_types(labels)
        self.type_index = {name: i for i, name in enumerate(self.types)}
        self.per_type = per_type
        for name in ("true_positives", "predicted", "gold"):
            self.add_state(name, default=torch.zeros(len(self.types), dtype=torch.long), dist_reduce_fx="sum")

    def _count(self, entities: set, state: torch.Tensor) -> None:
        for entity in entities:
            index = self.type_index.get(entity.type)
            if index is not None:
                state[index] += 1

    def update(self, predictions: Sequence[Sequence[str]], targets: Sequence[Sequence[str]]) -> None:
        """One tag sequence per sentence, one tag per word; ``predictions[i]`` aligns with ``targets[i]``."""
        for predicted_tags, gold_tags in zip(predictions, targets, strict=True):
            predicted, gold = set(extract_entities(predicted_tags)), set(extract_entities(gold_tags))
            self._count(predicted & gold, self.true_positives)
            self._count(predicted, self.predicted)
            self._count(gold, self.gold)

    @staticmethod
    def _f1(tp: torch.Tensor, predicted: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, ...]:
        precision = tp / predicted.clamp(min=1)
        recall = tp / gold.clamp(min=1)
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        return precision, recall, f1

    def compute(self) -> dict[str, torch.Tensor]:
        precision, recall, f1 = self._f1(
            self.true_positives.sum().double(), self.predicted.sum().double(), self.gold.sum().double()
        )
        result = {"precision": precision.float(), "recall": recall.float(), "f1": f1.float()}
        if self.per_type:
            _, _, type_f1 = self._f1(self.true_positives.double(), self.predicted.double(), self.gold.double())
            result.update({f"f1_{name}": type_f1[i].float() for i, name in enumerate(self.types)})
        return result
