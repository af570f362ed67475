"""``ClassificationDataModule``: text (+ pair) columns, label discovery and encoding."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from datasets import Dataset
from transformers import DataCollatorWithPadding

from lightning_peft.data.base import is_blank
from lightning_peft.data.labelled import LabelledDataModule
from lightning_peft.errors import LightningPeftError
from lightning_peft.types import ProblemType


class ClassificationDataModule(LabelledDataModule):
    """Text classification data: single-label, multi-label or regression.

    Label names are discovered from the training split (a ``ClassLabel`` feature's names, otherwise the
    sorted distinct values) unless ``labels`` lists them; validation/test labels outside that list are
    an error. Multi-label rows hold a list of labels, or a string joined by ``label_separator``.

    Args:
        text_column / text_pair_column: input text column(s); the pair column is optional.
        label_column: the label column (absent in prediction files is fine).
        labels: explicit label names in id order (overrides discovery).
        problem_type: ``single_label_classification``, ``multi_label_classification`` or ``regression``;
            the CLI links it to the model.
        label_separator: separator of multi-label strings such as ``"sports,politics"``.
        Other arguments: see :class:`~lightning_peft.data.base.TextDataModule`.

    Example::

        dm = ClassificationDataModule(
            tokenizer="bert-base-uncased", train_file="train.csv", validation_file="dev.csv", batch_size=32
        )
        dm.labels  # ['negative', 'positive']
    """

    passthrough_columns = ("text", "text_pair")
    supports_consistency = True

    def __init__(
        self,
        *args: Any,
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        labels: list[str] | None = None,
        problem_type: ProblemType = "single_label_classification",
        label_separator: str = ",",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.label_column = label_column
        self.explicit_labels = list(labels) if labels else None
        self.problem_type = problem_type
        self.label_separator = label_separator

    # -- labels -----------------------------------------------------------------------------------------
    def _row_labels(self, value: Any) -> list[str]:
        if self.problem_type != "multi_label_classification":
            return [str(value)]
        if isinstance(value, str):
            return [part.strip() for part in value.split(self.label_separator) if part.strip()]
        return [str(v) for v in value]

    def several_values_hint(self, column: str) -> str:
        if column == self.label_column:
            return ", or set data.init_args.problem_type: multi_label_classification for rows with several labels"
        if column == self.text_column and not self.text_pair_column:
            return ", or put a second text in its own column and name it in data.init_args.text_pair_column"
        return ""

    @property
    def uses_label_names(self) -> bool:
        return self.problem_type != "regression"

    def discover_labels(self, train: Dataset) -> list[str]:
        return sorted({label for value in train[self.label_column] for label in self._row_labels(value)})

    # -- TextDataModule hooks ---------------------------------------------------------------------------
    def required_columns(self, split: str) -> list[str]:
        columns = [self.text_column] + ([self.text_pair_column] if self.text_pair_column else [])
        return columns + ([self.label_column] if self.has_labels(split) else [])

    def prepare_split(self, dataset: Dataset, split: str) -> Dataset:
        self.check_filled(dataset, split, self.text_column, "text")
        if self.text_pair_column:
            self.check_filled(dataset, split, self.text_pair_column, "pair text")
        if not self.has_labels(split):
            return dataset
        if self.problem_type == "regression":
            for row, value in enumerate(dataset[self.label_column]):
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    number = math.nan
                if math.isnan(number):
                    raise LightningPeftError(
                        f"{self.describe(split)} row {row}: label {value!r} is not a number (problem_type: regression)"
                    ) from None
            return dataset
        dataset = self.decode_class_labels(dataset, self.label_column, split)
        if self.problem_type == "multi_label_classification":  # an empty string is a row with no labels
            for row, value in enumerate(dataset[self.label_column]):
                if is_blank(value) and not isinstance(value, str):
                    raise LightningPeftError(
                        f"{self.describe(split)} row {row}: no label (column {self.label_column!r}: {value!r}); give "
                        f"its labels joined by {self.label_separator!r}, an empty string for none, or remove the row"
                    )
        else:
            self.check_filled(dataset, split, self.label_column, "label")
        if split == "train" and not self.explicit_labels:
            return dataset  # the labels are discovered from this split
        known = self.label2id
        for row, value in enumerate(dataset[self.label_column]):
            for label in self._row_labels(value):
                if label not in known:
                    raise LightningPeftError(
                        f"{self.describe(split)} row {row}: label {label!r} is not among the training labels "
                        f"{list(known)}; fix the row or list every label in data.init_args.labels"
                    )
        return dataset

    def preprocess(self, examples: dict[str, list[Any]], split: str) -> dict[str, list[Any]]:
        texts = [str(t) for t in examples[self.text_column]]
        pairs = [str(t) for t in examples[self.text_pair_column]] if self.text_pair_column else None
        encoded = dict(self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length))
        if split == "predict":
            encoded["text"] = texts
            if pairs is not None:
                encoded["text_pair"] = pairs
            return encoded
        values = examples[self.label_column]
        if self.problem_type == "regression":
            encoded["labels"] = [float(v) for v in values]
        elif self.problem_type == "multi_label_classification":
            rows = [set(self._row_labels(v)) for v in values]
            encoded["labels"] = [[float(name in row) for name in self.labels] for row in rows]
        else:
            label2id = self.label2id
            encoded["labels"] = [label2id[str(v)] for v in values]
        return encoded

    def augment_example(self, example: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        """The text (and pair text) augmented; the label kept."""
        for column in filter(None, (self.text_column, self.text_pair_column)):
            example[column] = self.augmentation.text(str(example[column]), rng)
        return example

    def build_collator(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        return DataCollatorWithPadding(self.tokenizer)
