"""``Seq2SeqDataModule``: source → target text pairs (translation, summarisation), tokenised for a seq2seq model."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from datasets import Dataset
from lightning.pytorch.utilities import rank_zero_warn
from transformers import DataCollatorForSeq2Seq

from lightning_peft.data.base import TextDataModule, is_blank
from lightning_peft.errors import LightningPeftError
from lightning_peft.types import IGNORE_INDEX


class Seq2SeqDataModule(TextDataModule):
    """Pairs of source and target texts: flat columns, or the nested ``translation: {en: …, de: …}`` rows of HF
    translation sets (set ``source_lang`` and ``target_lang``).

    Targets become ``labels`` (padding -100, ignored by the loss); validation and test batches also carry the raw
    target text as the ``reference`` of the generation metrics, and predict batches the raw ``source``. Sources
    and targets cut by ``max_length`` / ``max_target_length`` are counted and reported once per split.
    Evaluation and prediction batches are served longest first (predictions are written in input order).

    Args:
        source_column / target_column: the text columns of flat rows.
        source_lang / target_lang: keys of the ``translation_column`` dicts; when set, they replace the columns.
        translation_column: the column holding ``{lang: text}`` dicts.
        source_prefix: text put before every source, e.g. ``"translate English to German: "`` for T5.
        max_length: longest source in tokens (longer ones are truncated and counted).
        max_target_length: longest target in tokens.
        group_by_length: on by default here: seq2seq models train in length-sorted micro-batches, not packed rows,
            so batches of similar lengths are what saves their padding.
        Other arguments: see :class:`~lightning_peft.data.base.TextDataModule`.

    Example::

        dm = Seq2SeqDataModule(
            tokenizer="t5-small", dataset_name="wmt16", dataset_config_name="de-en",
            source_lang="en", target_lang="de", source_prefix="translate English to German: ",
        )
    """

    passthrough_columns = ("source", "reference")
    count_columns = ("source_truncated", "target_truncated")
    length_sorted_splits = ("validation", "test", "predict")

    def __init__(
        self,
        *args: Any,
        source_column: str = "source",
        target_column: str = "target",
        source_lang: str | None = None,
        target_lang: str | None = None,
        translation_column: str = "translation",
        source_prefix: str = "",
        max_target_length: int = 128,
        group_by_length: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, group_by_length=group_by_length, **kwargs)
        if (source_lang is None) != (target_lang is None):
            raise LightningPeftError(
                "data.source_lang / data.target_lang: set both (nested translation rows) or neither"
            )
        if max_target_length < 1:
            raise LightningPeftError(f"data.max_target_length: must be a positive integer, got {max_target_length}")
        self.source_column = source_column
        self.target_column = target_column
        self.source_lang = source_lang
        self.target_lang = target_lang
        self.translation_column = translation_column
        self.source_prefix = source_prefix
        self.max_target_length = max_target_length

    # -- TextDataModule hooks ---------------------------------------------------------------------------
    def required_columns(self, split: str) -> list[str]:
        if self.source_lang is not None:
            return [self.translation_column]
        return [self.source_column] + ([self.target_column] if self.has_labels(split) else [])

    def _texts(self, rows: Dataset | dict[str, list[Any]], split: str) -> tuple[list[Any], list[Any] | None]:
        """The raw source and target values of a split or a batch of its rows (targets ``None`` for predict)."""
        if self.source_lang is None:
            targets = rows[self.target_column] if self.has_labels(split) else None
            return rows[self.source_column], targets
        sources, targets = [], []
        langs = [self.source_lang] + ([self.target_lang] if self.has_labels(split) else [])
        for row, pair in enumerate(rows[self.translation_column]):
            missing = [lang for lang in langs if not isinstance(pair, dict) or lang not in pair]
            if missing:
                found = sorted(pair) if isinstance(pair, dict) else type(pair).__name__
                raise LightningPeftError(
                    f"{self.describe(split)} row {row}: {self.translation_column} has no {missing[0]!r} "
                    f"(found {found}); check data.source_lang / data.target_lang"
                )
            sources.append(pair[self.source_lang])
            targets.append(pair.get(self.target_lang))
        return sources, targets if self.has_labels(split) else None

    def prepare_split(self, dataset: Dataset, split: str) -> Dataset:
        sources, targets = self._texts(dataset, split)
        for kind, texts in (("source", sources), ("target", targets or [])):
            for row, text in enumerate(texts):
                if is_blank(text):  # None, an empty csv cell (NaN), blank text
                    raise LightningPeftError(
                        f"{self.describe(split)} row {row}: empty {kind} text ({text!r}); remove the row or fill it in"
                    )
                if not isinstance(text, str):
                    raise LightningPeftError(
                        f"{self.describe(split)} row {row}: the {kind} text is a {type(text).__name__} ({text!r}); "
                        "give one text per row"
                    )
        return dataset

    def _encode(self, texts: list[str], limit: int, target: bool) -> tuple[list[list[int]], list[list[int]], list[int]]:
        """Token ids, attention masks and a truncated flag per text."""
        key = "text_target" if target else "text"
        encoded = self.tokenizer(**{key: texts}, truncation=True, max_length=limit, return_token_type_ids=False)
        ids = encoded["input_ids"]
        at_limit = [i for i, row in enumerate(ids) if len(row) >= limit]
        truncated = [0] * len(texts)
        if at_limit:  # only rows that reached the limit can have been cut: measure those in full
            full = self.tokenizer(**{key: [texts[i] for i in at_limit]}, return_token_type_ids=False)["input_ids"]
            for i, row in zip(at_limit, full, strict=True):
                truncated[i] = int(len(row) > limit)
        return ids, encoded["attention_mask"], truncated

    def augment_example(self, example: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        """The source augmented; the target, which the model learns to produce, kept."""
        if self.source_lang is None:
            example[self.source_column] = self.augmentation.text(str(example[self.source_column]), rng)
        else:
            pair = dict(example[self.translation_column])
            pair[self.source_lang] = self.augmentation.text(str(pair[self.source_lang]), rng)
            example[self.translation_column] = pair
        return example

    def preprocess(self, examples: dict[str, list[Any]], split: str) -> dict[str, list[Any]]:
        sources, targets = self._texts(examples, split)
        input_ids, attention_mask, source_cut = self._encode(
            [self.source_prefix + s for s in sources], self.max_length, target=False
        )
        encoded: dict[str, list[Any]] = {
            "input_ids": input_ids, "attention_mask": attention_mask, "source_truncated": source_cut
        }
        if split == "predict":
            encoded["source"] = sources
            return encoded
        encoded["labels"], _, encoded["target_truncated"] = self._encode(targets, self.max_target_length, target=True)
        if split != "train":
            encoded["reference"] = targets
        return encoded

    def report_counts(self, split: str, counts: dict[str, list[int]]) -> None:
        limits = {"source": ("max_length", self.max_length), "target": ("max_target_length", self.max_target_length)}
        for column, values in counts.items():
            kind = column.split("_")[0]
            if sum(values):
                option, limit = limits[kind]
                rank_zero_warn(
                    f"{split}: {sum(values)} of {len(values)} {kind} texts are longer than {option}={limit} tokens "
                    f"and were truncated (raise data.{option})"
                )

    def build_collator(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        return DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=IGNORE_INDEX)
