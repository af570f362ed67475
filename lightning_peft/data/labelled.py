"""``LabelledDataModule``: the label names of classification-style data, found once and shared with the model."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from datasets import ClassLabel, Dataset, Sequence, Value

from lightning_peft.data.base import TextDataModule
from lightning_peft.errors import LightningPeftError


class LabelledDataModule(TextDataModule):
    """A :class:`TextDataModule` whose rows carry named labels (classes, tags).

    :attr:`labels` is what the CLI links to the model (``data.labels`` → ``model.init_args.labels``); data without
    label names (seq2seq targets) derive from :class:`TextDataModule` directly and have no such attribute, so the
    link is skipped for them. Subclasses set :attr:`explicit_labels` from their config, implement
    :meth:`discover_labels`, and call :meth:`decode_class_labels` on ``ClassLabel`` columns.
    """

    #: label names given in the config; they win over discovery
    explicit_labels: list[str] | None = None
    #: names of a ``ClassLabel`` label feature, seen while decoding the train split
    _class_label_names: list[str] | None = None

    @property
    def uses_label_names(self) -> bool:
        """Whether this data has named labels at all (regression, for example, does not)."""
        return True

    def discover_labels(self, train: Dataset) -> list[str]:
        """Label names found in the (decoded) train split, in id order."""
        raise NotImplementedError

    @cached_property
    def labels(self) -> list[str] | None:
        """Label names in id order: ``explicit_labels``, else a ``ClassLabel`` feature's names, else discovered
        from the train split; ``None`` when :attr:`uses_label_names` is false. The CLI links them to the model."""
        if not self.uses_label_names:
            return None
        if self.explicit_labels:
            return self.explicit_labels
        train = self.raw_split("train")
        if train is None:
            raise LightningPeftError(
                "data.labels: cannot discover the label names without a train split; "
                "set data.init_args.labels or train_file"
            )
        return self._class_label_names or self.discover_labels(train)

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels or [])}

    def decode_class_labels(self, dataset: Dataset, column: str, split: str) -> Dataset:
        """Replace a ``ClassLabel`` (or sequence of ``ClassLabel``) column of ids by names, remembering the
        train split's name order for :attr:`labels`."""
        feature = dataset.features[column]
        inner = feature.feature if isinstance(feature, Sequence) else feature
        if not isinstance(inner, ClassLabel):
            return dataset
        if split == "train":
            self._class_label_names = list(inner.names)
        as_ints = Sequence(Value("int64")) if isinstance(feature, Sequence) else Value("int64")
        def name(label_id: int) -> str | None:
            return None if label_id < 0 else inner.int2str(label_id)  # -1: unlabelled (GLUE's test splits)

        def names(value: Any) -> Any:
            return [name(v) for v in value] if isinstance(value, list) else name(value)

        return dataset.cast_column(column, as_ints).map(  # plain ints first, or map re-encodes the names
            lambda batch: {column: [names(v) for v in batch[column]]}, batched=True, desc="Decoding labels"
        )
