"""``TextDataModule``: splits from an HF dataset or local files, tokenisation, batching. No task logic."""

from __future__ import annotations

import csv
import inspect
import math
import os
import random
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from datasets import Dataset, DatasetDict, load_dataset
from datasets.exceptions import DatasetGenerationError
from datasets.fingerprint import Hasher
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lightning_peft.backbone import load_tokenizer
from lightning_peft.data.augmentation import (
    AugmentedRows,
    EpochTaggedSampler,
    PairedBatches,
    TextAugmentation,
    as_augmentation,
)
from lightning_peft.data.sampling import EpochSeededSampler, ResumableDataLoader
from lightning_peft.errors import LightningPeftError

SPLITS = ("train", "validation", "test", "predict")
DEFAULT_ORDER_SEED = 42  # training order without a data seed or a run seed
STAGE_SPLITS = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",), "predict": ("predict",)}
_READERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
}


def preprocessing_code(datamodule_class: type) -> str:
    """Hash of the source files that turn raw rows into tokens for ``datamodule_class``: every module of
    ``lightning_peft.data`` and the module of each class it inherits from (a user's subclass too). Part of the cache
    key of tokenised splits, so upgrading lightning-peft or editing a subclass never serves tokens the old code made.
    """
    files = set(Path(__file__).parent.glob("*.py"))
    files.update(
        Path(inspect.getsourcefile(cls)) for cls in datamodule_class.__mro__ if issubclass(cls, TextDataModule)
    )
    return Hasher.hash(sorted((path.name, path.read_bytes()) for path in files))


def is_blank(value: Any) -> bool:
    """Whether a data cell holds nothing: ``None``, NaN (an empty csv cell read by pandas) or blank text."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and not value.strip()


def _parser_error(err: BaseException) -> BaseException:
    """The parser's own error under datasets' ``DatasetGenerationError`` ("An error occurred while generating the
    dataset"), which names no cause: a bad encoding, a JSON syntax error, an unterminated quote."""
    while isinstance(err, DatasetGenerationError) and (err.__cause__ or err.__context__):
        err = err.__cause__ or err.__context__
    return err


def _has_rows(path: Path, header: bool) -> bool:
    """Whether a text data file holds at least one record (after its header line, for csv/tsv)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = (line for line in f if line.strip())
        return next(lines, None) is not None and (not header or next(lines, None) is not None)


class PassthroughCollator:
    """Pads the model inputs with ``collator`` and passes ``columns`` (e.g. raw text) through as lists."""

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]], columns: tuple[str, ...]) -> None:
        self.collator = collator
        self.columns = columns

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        extras = {c: [f.pop(c) for f in features] for c in self.columns if c in features[0]}
        return {**self.collator(features), **extras}


class TextDataModule(LightningDataModule):
    """Base datamodule: finds each split, checks it, tokenises it and serves batches.

    Subclasses implement :meth:`required_columns`, :meth:`preprocess` (batched ``datasets.map`` function)
    and :meth:`build_collator`, and may check or normalise a raw split in :meth:`prepare_split`.

    Args:
        tokenizer: tokenizer hub id or directory; the CLI links it from the model's backbone.
        dataset_name / dataset_config_name: an HF dataset loaded with ``datasets.load_dataset``.
        train_file / validation_file / test_file / predict_file: local csv, tsv, json or jsonl files;
            a file given for a split takes precedence over ``dataset_name``.
        predict_split: the ``dataset_name`` split used for ``predict`` when no ``predict_file`` is given.
        max_length: truncate inputs to this many tokens.
        batch_size / eval_batch_size: per-device batch sizes (evaluation defaults to ``batch_size``).
        group_by_length: batch training examples of similar length together (less padding, faster, but batches
            less random); off by default, because classifiers and taggers train on packed rows, which compute
            almost no padding whatever the batch (see ``training.sequence_packing``); on for seq2seq. Evaluation batches
            are always length-sorted, prediction keeps the input order.
        group_by_length_window: how many random batches are pooled and sorted by length into batches; larger
            saves more padding but makes batches more length-homogeneous, which can cost accuracy; ``null``
            sorts the whole split (see :class:`~lightning_peft.data.sampling.EpochSeededSampler`).
        limit_train_samples / limit_eval_samples: keep the first N rows of train / of validation and test.
        limit_predict_samples: keep the first N rows of the predict split (a quick look at a model's outputs).
        num_workers: DataLoader worker processes.
        seed: seed of the per-epoch training order; ``null`` (the default) takes the run's seed
            (``seed_everything``), so another run seed also draws another order (42 without one).
        augmentation: noise added to the training rows' input text on the fly, anew each epoch and seeded with the
            order (see :class:`~lightning_peft.data.augmentation.TextAugmentation`); never to evaluation splits.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        dataset_name: str | None = None,
        dataset_config_name: str | None = None,
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        predict_split: str = "test",
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        group_by_length: bool = False,
        group_by_length_window: int | None = 2,
        limit_train_samples: int | None = None,
        limit_eval_samples: int | None = None,
        num_workers: int = 0,
        seed: int | None = None,
        limit_predict_samples: int | None = None,
        augmentation: TextAugmentation | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer_name_or_path = tokenizer
        self.dataset_name = dataset_name
        self.dataset_config_name = dataset_config_name
        self.files = {"train": train_file, "validation": validation_file, "test": test_file, "predict": predict_file}
        self.predict_split = predict_split
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.group_by_length = group_by_length
        self.group_by_length_window = group_by_length_window
        self.limits = {"train": limit_train_samples, "validation": limit_eval_samples, "test": limit_eval_samples,
                       "predict": limit_predict_samples}
        self.num_workers = num_workers
        self.seed = seed
        self.augmentation = as_augmentation(augmentation)
        if self.augmentation is not None and self.augmentation.kinds and not self.supports_augmentation:
            raise LightningPeftError(
                f"data.init_args.augmentation: {type(self).__name__} does not augment its rows; remove augmentation"
            )
        if self.augmentation is not None and self.augmentation.consistency and not self.supports_consistency:
            raise LightningPeftError(
                f"data.init_args.augmentation.consistency: {type(self).__name__}'s views of a row do not give one "
                "prediction each to compare (sequence classification only); set it to 0"
            )
        self.datasets: dict[str, Dataset] = {}
        self._raw: dict[str, Dataset | None] = {}
        self._train_sampler: EpochSeededSampler | None = None
        self._train_position: tuple[int, int] | None = None  # (epoch, samples done) of a resumed fit
        checks = {"batch_size": batch_size, "eval_batch_size": eval_batch_size, "max_length": max_length,
                  "group_by_length_window": group_by_length_window, "limit_train_samples": limit_train_samples,
                  "limit_eval_samples": limit_eval_samples, "limit_predict_samples": limit_predict_samples}
        for name, value in checks.items():
            if value is not None and value < 1:
                raise LightningPeftError(f"data.{name}: must be a positive integer, got {value}")
        if num_workers < 0:
            raise LightningPeftError(f"data.num_workers: must be 0 (the main process) or more, got {num_workers}")

    # -- hooks for task datamodules ---------------------------------------------------------------------
    def required_columns(self, split: str) -> list[str]:
        raise NotImplementedError

    def prepare_split(self, dataset: Dataset, split: str) -> Dataset:
        """Check (raise :class:`LightningPeftError`) and normalise a raw split whose columns are present."""
        return dataset

    def preprocess(self, examples: dict[str, list[Any]], split: str) -> dict[str, list[Any]]:
        raise NotImplementedError

    def build_collator(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        raise NotImplementedError

    #: raw columns kept next to the model inputs in predict batches (for writing predictions)
    passthrough_columns: tuple[str, ...] = ()
    #: splits served longest first, to waste little padding in evaluation; a sorted predict split records its
    #: ``predict_order`` (original row of each served row), by which the prediction writer restores input order
    length_sorted_splits: tuple[str, ...] = ("validation", "test")
    predict_order: list[int] | None = None
    #: whether a row and its augmented view give one prediction each (``augmentation.consistency`` may be set)
    supports_consistency: ClassVar[bool] = False
    #: per-row counts that :meth:`preprocess` emits (e.g. truncated words), handed to :meth:`report_counts`
    count_columns: tuple[str, ...] = ()

    def check_filled(self, dataset: Dataset, split: str, column: str, what: str) -> None:
        """Raise, naming the split's file, the row and the column, when a cell of ``column`` is empty (see
        :func:`is_blank`) or not one value (a list or a mapping, from json rows): either would otherwise be trained on
        as its string, ``"None"`` or ``"['a', 'b']"``."""
        for row, value in enumerate(dataset[column]):
            if is_blank(value):
                raise LightningPeftError(
                    f"{self.describe(split)} row {row}: empty {what} (column {column!r}: {value!r}); fill it in or "
                    "remove the row"
                )
            if isinstance(value, (list, dict)):
                raise LightningPeftError(
                    f"{self.describe(split)} row {row}: the {what} (column {column!r}) is a "
                    f"{'list' if isinstance(value, list) else 'mapping'} ({value!r}); give one {what} per row"
                    + self.several_values_hint(column)
                )

    def several_values_hint(self, column: str) -> str:
        """What to do instead when ``column`` holds several values (e.g. multi-label classification); a hook."""
        return ""

    def report_counts(self, split: str, counts: dict[str, list[int]]) -> None:
        """Warn about what preprocessing had to change in ``split`` (e.g. truncation); the columns are then dropped."""

    @property
    def supports_augmentation(self) -> bool:
        """Whether this datamodule implements :meth:`augment_example`, so that ``augmentation`` may be set."""
        return type(self).augment_example is not TextDataModule.augment_example

    def augment_example(self, example: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        """One raw training row with :attr:`augmentation` applied to its input text (never to labels or targets),
        drawing from ``rng``; implemented by the datamodules that can augment (:attr:`supports_augmentation`)."""
        raise NotImplementedError

    def finish_split(self, dataset: Dataset, split: str) -> Dataset:
        """The tokenised split after :meth:`report_counts` (e.g. without rows that preprocessing emptied); as is."""
        return dataset

    def has_labels(self, split: str) -> bool:
        """Whether rows of ``split`` carry labels or targets (prediction inputs do not)."""
        return split != "predict"

    # -- raw splits -------------------------------------------------------------------------------------
    def describe(self, split: str) -> str:
        """How a split is named in messages: the config field and its file, or the HF dataset split."""
        if self.files[split]:
            return f"{split}_file {self.files[split]!r}"
        hub_split = self.predict_split if split == "predict" else split
        return f"dataset_name {self.dataset_name!r} split {hub_split!r}"

    def card_facts(self) -> dict[str, Any]:
        """What a model card says about the data: its source per split, sizes once set up, and batching."""
        facts: dict[str, Any] = {}
        if self.dataset_name:
            facts["dataset"] = " / ".join(filter(None, (self.dataset_name, self.dataset_config_name)))
        for split in ("train", "validation", "test"):
            if self.files[split]:
                facts[f"{split} file"] = self.files[split]
            if split in self.datasets:
                facts[f"{split} rows"] = len(self.datasets[split])
        return {**facts, "max_length": self.max_length, "batch_size": self.batch_size}

    @cached_property
    def _hub_dataset(self) -> DatasetDict:
        try:
            return load_dataset(self.dataset_name, self.dataset_config_name)
        except Exception as err:  # datasets raises many types for a missing/unreachable dataset
            raise LightningPeftError(
                f"data.dataset_name: cannot load {self.dataset_name!r} (config {self.dataset_config_name!r}): "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}. "
                "Check the name, or give local files with train_file/validation_file/test_file."
            ) from err

    def _read_file(self, split: str) -> Dataset:
        path = Path(self.files[split])
        field = f"data.{split}_file"
        if not path.is_file():
            raise LightningPeftError(f"{field}: {str(path)!r} does not exist or is not a file")
        return self.read_file(path, field)

    def read_file(self, path: Path, field: str) -> Dataset:
        """Rows of one local file (csv, tsv, json, jsonl); subclasses add formats (e.g. CoNLL)."""
        if path.suffix.lower() not in _READERS:
            raise LightningPeftError(
                f"{field}: {str(path)!r} has an unsupported extension; use one of {sorted(_READERS)}"
            )
        builder, kwargs = _READERS[path.suffix.lower()]
        if not _has_rows(path, header=builder == "csv"):
            raise LightningPeftError(f"{field}: {str(path)!r} has no rows; give a non-empty split")
        try:
            return load_dataset(builder, data_files=str(path), split="train", **kwargs)
        except Exception as err:  # parser errors surface as several datasets/pyarrow/pandas types
            cause = _parser_error(err)
            hint = "; save the file as UTF-8" if isinstance(cause, UnicodeDecodeError) else ""
            raise LightningPeftError(
                f"{field}: cannot read {str(path)!r} as {path.suffix.lstrip('.')}: "
                f"{str(cause).splitlines()[0] if str(cause) else type(cause).__name__}{hint}"
            ) from err

    def raw_split(self, split: str) -> Dataset | None:
        """The split's rows before tokenisation (limits applied, columns checked), or ``None`` if not given."""
        if split not in self._raw:
            self._raw[split] = self._load_raw(split)
        return self._raw[split]

    def _load_raw(self, split: str) -> Dataset | None:
        if self.files[split]:
            dataset = self._read_file(split)
        elif self.dataset_name:
            hub_split = self.predict_split if split == "predict" else split
            dataset = self._hub_dataset.get(hub_split)
            if dataset is None:
                return None
        else:
            return None
        limit = self.limits.get(split)
        if limit is not None and limit < len(dataset):
            dataset = dataset.select(range(limit))
        if len(dataset) == 0:
            raise LightningPeftError(f"{self.describe(split)} has no rows; give a non-empty split")
        missing = [c for c in self.required_columns(split) if c not in dataset.column_names]
        if missing:
            raise LightningPeftError(
                f"{self.describe(split)} has no column {missing[0]!r} (columns: {', '.join(dataset.column_names)}); "
                f"rename it or set the matching data.*_column option"
            )
        return self.prepare_split(dataset, split)

    # -- tokenisation -----------------------------------------------------------------------------------
    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.load_tokenizer()

    def load_tokenizer(self, **kwargs: Any) -> PreTrainedTokenizerBase:
        """``data.tokenizer`` loaded by ``AutoTokenizer.from_pretrained`` (with ``kwargs``)."""
        return load_tokenizer(self.tokenizer_name_or_path, "data.tokenizer", **kwargs)

    def setup(self, stage: str) -> None:
        for split in STAGE_SPLITS[stage]:
            if split in self.datasets:
                continue
            raw = self.raw_split(split)
            if raw is None:
                if split in ("train", "test", "predict"):
                    field = "predict_file" if split == "predict" else f"{split}_file"
                    raise LightningPeftError(
                        f"data.{field}: {getattr(stage, 'value', stage)} needs a {split} split; set {field} or "
                        "dataset_name"
                    )
                continue
            keep = set(self.passthrough_columns) if split == "predict" else set()
            processed = raw.map(
                self.preprocess,
                batched=True,
                fn_kwargs={"split": split},
                remove_columns=[c for c in raw.column_names if c not in keep],
                new_fingerprint=self._fingerprint(raw, split),
                desc=f"Tokenising {split}",
            )
            counts = [c for c in self.count_columns if c in processed.column_names]
            if counts:
                self.report_counts(split, {c: processed[c] for c in counts})
                processed = processed.remove_columns(counts)
            processed = self.finish_split(processed, split)
            if split in self.length_sorted_splits:
                lengths = np.fromiter((len(ids) for ids in processed["input_ids"]), dtype=np.int64)
                order = np.argsort(-lengths, kind="stable")
                processed = processed.select(order)
                if split == "predict":
                    self.predict_order = order.tolist()
            self.datasets[split] = processed

    def _fingerprint(self, raw: Dataset, split: str) -> str:
        """Cache key of a tokenised split: the raw data, this datamodule's class, its code and arguments, the
        tokenizer's contents (not only its path: a tokenizer re-trained in place, or a new chat template, must not
        reuse old tokens) and the split."""
        settings = sorted(
            (k, repr(v))
            for k, v in vars(self).items()
            if not k.startswith("_") and k != "datasets" and isinstance(v, (str, int, float, list, dict))
        )
        return Hasher.hash((raw._fingerprint, type(self).__qualname__, preprocessing_code(type(self)), settings,
                            Hasher.hash(self.tokenizer), split))

    @cached_property
    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        return PassthroughCollator(self.build_collator(), self.passthrough_columns)

    # -- loaders ----------------------------------------------------------------------------------------
    def _loader(self, dataset: Any, loader_class: type = DataLoader, **batching: Any) -> DataLoader:
        """A loader of ``dataset`` with this datamodule's collator and workers; ``batching``: ``batch_size`` (and a
        ``sampler``), or a ``batch_sampler``."""
        return loader_class(dataset, collate_fn=self.collator, num_workers=self.num_workers,
                            persistent_workers=self.num_workers > 0, **batching)

    def train_dataloader(self) -> DataLoader:
        """Batches in :class:`EpochSeededSampler` order, resumable mid-epoch (see :class:`ResumableDataLoader`)."""
        lengths = [len(ids) for ids in self.datasets["train"]["input_ids"]]
        self._train_sampler = EpochSeededSampler(
            lengths, self.batch_size, self.group_by_length, window=self.group_by_length_window, seed=self.order_seed
        )
        if self._train_position is not None:
            self._train_sampler.resume_at(*self._train_position)
        in_order = {"batch_size": self.batch_size, "sampler": self._train_sampler}
        if self.augmentation is None or not self.augmentation.kinds:
            return self._loader(self.datasets["train"], ResumableDataLoader, **in_order)
        rows = AugmentedRows(self.raw_split("train"), self, self.order_seed)  # tokenised as they are drawn
        if not rows.paired:
            tagged = EpochTaggedSampler(self._train_sampler)
            return self._loader(rows, ResumableDataLoader, batch_size=self.batch_size, sampler=tagged)
        paired = PairedBatches(self._train_sampler, self.batch_size, len(rows.raw))
        return self._loader(rows, ResumableDataLoader, batch_sampler=paired)

    @property
    def order_seed(self) -> int:
        """``seed``, or the run's seed (``seed_everything`` sets ``PL_GLOBAL_SEED``), or 42."""
        if self.seed is not None:
            return self.seed
        return int(os.environ.get("PL_GLOBAL_SEED", DEFAULT_ORDER_SEED))

    def _batches_done(self) -> int:
        """Training batches run so far in the current epoch (0 outside a fit)."""
        trainer = self.trainer
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0

    def state_dict(self) -> dict[str, int]:
        """Where training stands in the epoch, saved in checkpoints. The datamodule carries it rather than the train
        loader: Lightning restores a loader's state only into a loader built after the restore, and ours is
        usually built before it (``configure_optimizers`` asks for ``estimated_stepping_batches``)."""
        if self._train_sampler is None:
            return {}
        return {"train_epoch": self._train_sampler.epoch, "train_batches_done": self._batches_done()}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if "train_epoch" not in state_dict:
            return
        self._train_position = (state_dict["train_epoch"], state_dict["train_batches_done"] * self.batch_size)
        if self._train_sampler is not None:
            self._train_sampler.resume_at(*self._train_position)

    def val_dataloader(self) -> DataLoader | list:
        if "validation" not in self.datasets:
            return []
        return self._loader(self.datasets["validation"], batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"], batch_size=self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["predict"], batch_size=self.eval_batch_size)
