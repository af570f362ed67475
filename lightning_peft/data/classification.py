"""``ClassificationDataModule``: text (+ pair) columns, label discovery and encoding."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import Any

from datasets import ClassLabel, Dataset, Sequence, Value
from transformers import DataCollatorWithPadding

from lightning_peft.data.base import TextDataModule
from lightning_peft.errors import LightningPeftError
from lightning_peft.tasks.classification import ProblemType


class ClassificationDataModule(TextDataModule):
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
        self._class_label_names: list[str] | None = None

    # -- labels -----------------------------------------------------------------------------------------
    def _row_labels(self, value: Any) -> list[str]:
        if self.problem_type != "multi_label_classification":
            return [str(value)]
        if isinstance(value, str):
            return [part.strip() for part in value.split(self.label_separator) if part.strip()]
        return [str(v) for v in value]

    @cached_property
    def labels(self) -> list[str] | None:
        """Label names in id order (``None`` for regression)."""
        if self.problem_type == "regression":
            return None
        if self.explicit_labels:
            return self.explicit_labels
        train = self.raw_split("train")
        if train is None:
            raise LightningPeftError(
                "data.labels: cannot discover the label names without a train split; "
                "set data.init_args.labels or train_file"
            )
        if self._class_label_names is not None:
            return self._class_label_names
        return sorted({label for value in train[self.label_column] for label in self._row_labels(value)})

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels or [])}

    # -- TextDataModule hooks ---------------------------------------------------------------------------
    def has_labels(self, split: str) -> bool:
        return split != "predict"

    def required_columns(self, split: str) -> list[str]:
        columns = [self.text_column] + ([self.text_pair_column] if self.text_pair_column else [])
        return columns + ([self.label_column] if self.has_labels(split) else [])

    def _decode_class_labels(self, dataset: Dataset, split: str) -> Dataset:
        """Replace a ``ClassLabel`` column (ints) by label names, remembering the train split's name order."""
        feature = dataset.features[self.label_column]
        inner = feature.feature if isinstance(feature, Sequence) else feature
        if not isinstance(inner, ClassLabel):
            return dataset
        if split == "train":
            self._class_label_names = list(inner.names)
        column = self.label_column
        as_ints = Sequence(Value("int64")) if isinstance(feature, Sequence) else Value("int64")
        return dataset.cast_column(column, as_ints).map(  # plain ints first, or map re-encodes the names
            lambda batch: {column: [inner.int2str(v) for v in batch[column]]}, batched=True, desc="Decoding labels"
        )

    def prepare_split(self, dataset: Dataset, split: str) -> Dataset:
        if not self.has_labels(split):
            return dataset
        if self.problem_type == "regression":
            for row, value in enumerate(dataset[self.label_column]):
                try:
                    float(value)
                except (TypeError, ValueError):
                    raise LightningPeftError(
                        f"{self.describe(split)} row {row}: label {value!r} is not a number (problem_type: regression)"
                    ) from None
            return dataset
        dataset = self._decode_class_labels(dataset, split)
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

    def build_collator(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        return DataCollatorWithPadding(self.tokenizer)
