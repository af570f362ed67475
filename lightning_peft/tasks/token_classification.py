"""``TokenClassifier``: word-level tagging (NER) with entity-level metrics over a PEFT backbone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from peft import PeftConfig, TaskType
from torchmetrics import MetricCollection
from transformers import AutoModelForTokenClassification

from lightning_peft.backbone import BackboneConfig
from lightning_peft.errors import LightningPeftError
from lightning_peft.metrics.entities import OUTSIDE, sentence_record
from lightning_peft.metrics.entity_f1 import EntityF1
from lightning_peft.tasks.base import PeftModule, label_config
from lightning_peft.training import TrainingConfig
from lightning_peft.types import IGNORE_INDEX, AttributionTarget, Batch


def first_subtoken_tags(token_tags: Sequence[int], word_ids: Sequence[int | None], num_words: int,
                        labels: Sequence[str]) -> list[str]:
    """One tag per word: the tag of its first sub-token (``word_ids`` maps positions to words; ``None`` or -1 for
    special tokens and padding); words without sub-tokens get ``O``. What ``predict`` and the server both use."""
    tags = [OUTSIDE] * num_words
    previous = None
    for position, word in enumerate(word_ids):
        if word is not None and word >= 0 and word != previous:
            tags[word] = labels[token_tags[position]]
        previous = word
    return tags


class TokenClassifier(PeftModule):
    """Tag every word of a sentence; evaluated per word and per entity (seqeval/conlleval semantics).

    Predictions are made on each word's first sub-token and mapped back to one tag per word, so metrics and
    outputs never count sub-tokens; words cut off by ``max_length`` are predicted ``O``.

    Args:
        labels: the tag set in id order; the CLI links it from the datamodule.
        Other arguments: see :class:`~lightning_peft.tasks.base.PeftModule`.

    Example::

        from peft import LoraConfig
        model = TokenClassifier(
            backbone=BackboneConfig("bert-base-cased"),
            peft=LoraConfig(r=8, target_modules=["query", "value"]),
            labels=["O", "B-PER", "I-PER", "B-LOC", "I-LOC"],
        )

    To add a CRF or another decoder, subclass and override :meth:`forward` (batch → emission scores),
    :meth:`compute_loss` and :meth:`decode` (scores → one tag id per sub-token).
    """

    auto_model_class = AutoModelForTokenClassification
    peft_task_type = TaskType.TOKEN_CLS
    compressed_export = True
    pipeline_tag = "token-classification"

    sequence_keys = (*PeftModule.sequence_keys, "labels")

    @classmethod
    def checkpoint_metric(cls, init_args: dict[str, Any]) -> tuple[str, str]:
        """Entity F1: with rare entities the loss, dominated by ``O`` tokens, bottoms out before F1 peaks."""
        return "val/f1", "max"

    def __init__(
        self,
        backbone: BackboneConfig,
        peft: PeftConfig | None = None,
        labels: list[str] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        training: TrainingConfig | None = None,
    ) -> None:
        super().__init__(backbone, peft, optimizer, training)
        if not labels:
            raise LightningPeftError("model.labels: a tagger needs its tag set (the CLI links it from the datamodule)")
        self.labels = list(labels)
        self.build_backbone(**self.model_config_kwargs())

    def model_config_kwargs(self) -> dict[str, Any]:
        return label_config(self.labels)

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"entities": EntityF1(self.labels, per_type=True)})

    def forward(self, batch: Batch) -> torch.Tensor:
        inputs = self.model_inputs(batch)
        logits = self.model(**inputs).logits
        return logits[:, -inputs["input_ids"].shape[1]:]  # prompt tuning / p-tuning prepend virtual tokens

    def compute_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(
            logits.flatten(0, 1), batch["labels"].flatten(),
            ignore_index=IGNORE_INDEX, label_smoothing=self.label_smoothing,
        )

    def loss_weight(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def explanation_encoding(self, tokenizer: Any, text: str, max_length: int) -> Any:
        """``text`` split into words on whitespace, tokenized as the datamodule does."""
        return tokenizer(text.split(), is_split_into_words=True, truncation=True, max_length=max_length,
                         return_tensors="pt")

    def attribution_targets(self, logits: torch.Tensor, encoding: Any, text: str,
                            target: str | None) -> tuple[dict[str, Any], list[AttributionTarget]]:
        """Words, tags and entities; explained: each predicted entity (the sum of its words' tag logits)."""
        words, word_ids = text.split(), encoding.word_ids()
        first_token: dict[int, int] = {}
        for position, word in enumerate(word_ids):
            if word is not None and word not in first_token:
                first_token[word] = position
        tag_ids = logits[0].argmax(-1)
        record = sentence_record(words, first_subtoken_tags(tag_ids.tolist(), word_ids, len(words), self.labels))
        entities = record["entities"]
        targets = []
        for entity in entities:
            positions = [first_token[w] for w in range(entity["start"], entity["end"] + 1) if w in first_token]
            tag_of = [int(tag_ids[p]) for p in positions]
            subtokens = [p for p, w in enumerate(word_ids) if w is not None and entity["start"] <= w <= entity["end"]]

            def score(out: torch.Tensor, positions: list[int] = positions, tag_of: list[int] = tag_of) -> torch.Tensor:
                return sum(out[:, p, t] for p, t in zip(positions, tag_of, strict=True))

            targets.append(AttributionTarget(f"{entity['type']}: {entity['text']}", score, subtokens, entity))
        return record, targets

    def decode(self, logits: torch.Tensor, batch: Batch) -> list[list[int]]:
        """One tag id per sub-token position."""
        return logits.argmax(-1).tolist()

    def word_tags(self, logits: torch.Tensor, batch: Batch) -> list[list[str]]:
        """One predicted tag per word: the tag of its first sub-token; words without sub-tokens get ``O``."""
        return [first_subtoken_tags(token_ids, word_ids, num_words, self.labels) for token_ids, word_ids, num_words
                in zip(self.decode(logits, batch), batch["word_ids"], self._num_words(batch), strict=True)]

    @staticmethod
    def _num_words(batch: Batch) -> list[int]:
        if "word_tags" in batch:
            return [len(tags) for tags in batch["word_tags"]]
        return [len(words) for words in batch["words"]]

    def update_metrics(self, metrics: MetricCollection, logits: torch.Tensor, batch: Batch) -> None:
        gold = [[self.labels[t] for t in row] for row in batch["word_tags"]]
        metrics.update(self.word_tags(logits, batch), gold)

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict[str, Any]]:
        """Per sentence: its ``words``, ``tags`` (one per word) and ``entities`` (type, first and last word index,
        text)."""
        return [sentence_record(words, tags)
                for words, tags in zip(batch["words"], self.word_tags(self(batch), batch), strict=True)]
