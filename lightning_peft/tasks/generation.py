"""``TextGenerator``: what the generating tasks share — a ``GenerationConfig``, generation metrics on a few
validation batches and the whole test split, token perplexity on every evaluation batch, seeded sampling."""

from __future__ import annotations

import copy
from abc import abstractmethod
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from peft import PeftConfig
from torchmetrics import MetricCollection
from torchmetrics.text import Perplexity
from transformers import GenerationConfig, PreTrainedTokenizerBase

from lightning_peft.backbone import BackboneConfig, load_tokenizer
from lightning_peft.errors import LightningPeftError
from lightning_peft.metrics.generation import generation_metrics
from lightning_peft.tasks.base import PeftModule
from lightning_peft.training import TrainingConfig
from lightning_peft.types import IGNORE_INDEX, Batch

DEFAULT_MAX_NEW_TOKENS = 128


def build_generation_config(base: GenerationConfig, overrides: dict[str, Any]) -> GenerationConfig:
    """``base`` (the model's generation defaults) updated with ``overrides``, checked by transformers; without a
    length limit in either, ``max_new_tokens`` is 128 (transformers' own default of 20 tokens cuts most outputs), and
    ``do_sample`` is written out (greedy unless either says otherwise), as the exported ``generation_config.json``
    must say it: ``pipeline("text-generation")`` samples at temperature 0.7 where a model's config is silent."""
    known = set(GenerationConfig().to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise LightningPeftError(
            f"model.generation: unknown option {unknown[0]!r}; use GenerationConfig fields such as num_beams, "
            "max_new_tokens, temperature, top_p, do_sample, no_repeat_ngram_size"
        )
    config = copy.deepcopy(base)
    try:
        config.update(**overrides)
    except ValueError as err:
        raise LightningPeftError(f"model.generation: {str(err).strip().splitlines()[0]}") from err
    if "max_length" not in overrides and "max_new_tokens" not in overrides and config.max_new_tokens is None:
        config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    if config.do_sample is None:  # explicit in exports: text-generation pipelines sample unless told not to
        config.do_sample = False
    if config.num_return_sequences not in (None, 1):
        raise LightningPeftError(
            "model.generation.num_return_sequences: one output per input is written and scored; set it to 1"
        )
    try:
        config.validate(strict=True)
    except ValueError as err:
        raise LightningPeftError(f"model.generation: {str(err).strip().splitlines()[0]}") from err
    return config


class TextGenerator(PeftModule):
    """Base of the tasks that generate text (:class:`~lightning_peft.Seq2SeqGenerator`,
    :class:`~lightning_peft.CausalGenerator`).

    Validation logs ``val/loss`` and ``val/perplexity`` (over the target tokens) on every batch and generates on
    ``val_generation_batches`` batches spread over the (length-sorted) validation set for ``val/bleu``, ``val/chrf``
    and ``val/rouge1|2|L``; test does both on every batch. Sampling (``generation.do_sample``) is seeded per batch
    from ``generation_seed``, so predictions are reproducible and training's random state is left alone.
    Subclasses implement :meth:`generate`, :meth:`token_scores` and ``predict_step``.

    Args:
        generation: ``transformers.GenerationConfig`` options (``num_beams``, ``max_new_tokens``, ``do_sample``,
            ``temperature``, ``top_p``, …) over the model's own defaults.
        val_generation_batches: how many validation batches to generate on per validation run (``null``: all).
        metrics_lowercase: compute BLEU and chrF case-insensitively.
        generation_seed: seed of sampling, per batch (``seed + batch index``).
        Other arguments: see :class:`~lightning_peft.tasks.base.PeftModule`.
    """

    def __init__(
        self,
        backbone: BackboneConfig,
        peft: PeftConfig | None = None,
        generation: dict[str, Any] | None = None,
        val_generation_batches: int | None = 8,
        metrics_lowercase: bool = False,
        generation_seed: int = 0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        training: TrainingConfig | None = None,
    ) -> None:
        super().__init__(backbone, peft, optimizer, training)
        if val_generation_batches is not None and val_generation_batches < 0:
            raise LightningPeftError(
                f"model.val_generation_batches: must be a non-negative integer or null, got {val_generation_batches}"
            )
        self.val_generation_batches = val_generation_batches
        self.metrics_lowercase = metrics_lowercase
        self.generation_seed = generation_seed
        self.generation_options = dict(generation or {})

    def build_backbone(self, **model_kwargs: Any) -> None:
        """Load the backbone, then :attr:`generation_config` (the model's defaults with ``generation`` over them)."""
        super().build_backbone(**model_kwargs)
        self.generation_config = build_generation_config(self.model.generation_config, self.generation_options)
        perplexity = MetricCollection({"perplexity": Perplexity(ignore_index=IGNORE_INDEX)})
        self.val_perplexity = perplexity.clone(prefix="val/")
        self.test_perplexity = perplexity.clone(prefix="test/")

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """Decodes generated ids; the same tokenizer the datamodule encodes with (the backbone's)."""
        return load_tokenizer(self.backbone_config.tokenizer_name_or_path, "model.backbone.tokenizer")

    def build_metrics(self) -> MetricCollection:
        return generation_metrics(lowercase=self.metrics_lowercase)

    @abstractmethod
    def generate(self, batch: Batch) -> list[str]:
        """The decoded outputs for the batch's inputs, with :attr:`generation_config`."""

    @abstractmethod
    def token_scores(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits`` and their target ids shaped as torchmetrics' ``Perplexity`` takes them: (rows, positions,
        vocabulary) and (rows, positions), -100 where nothing is scored."""

    def seeded_generate(self, batch: Batch, batch_idx: int) -> list[str]:
        """:meth:`generate` with sampling seeded by ``generation_seed + batch_idx``, outside the training RNG."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.generation_seed + batch_idx)
            return self.generate(batch)

    def update_metrics(self, metrics: MetricCollection, logits: torch.Tensor, batch: Batch) -> None:
        raise NotImplementedError("generation metrics are updated by validation_step / test_step")

    def _score(self, batch: Batch, batch_idx: int, stage: str, generate: bool) -> None:
        logits, batch = self._evaluation_step(batch, stage, None)
        perplexity = self.val_perplexity if stage == "val" else self.test_perplexity
        perplexity.update(*self.token_scores(logits, batch))
        if generate and batch.get("reference") is not None:
            metrics = self.val_metrics if stage == "val" else self.test_metrics
            metrics.update(self.seeded_generate(batch, batch_idx), [[reference] for reference in batch["reference"]])

    def generates_in_validation(self, batch_idx: int) -> bool:
        """Whether validation batch ``batch_idx`` is one of the ``val_generation_batches`` spread over the epoch."""
        if self.val_generation_batches is None:
            return True
        if self.val_generation_batches == 0:
            return False
        total = self.trainer.num_val_batches[0] if self.trainer.num_val_batches else 0
        if total == float("inf") or total <= self.val_generation_batches:
            return batch_idx < self.val_generation_batches
        stride = int(total) // self.val_generation_batches
        return batch_idx % stride == 0 and batch_idx // stride < self.val_generation_batches

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._score(batch, batch_idx, "val", self.generates_in_validation(batch_idx))

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._score(batch, batch_idx, "test", True)

    def _log_stage(self, stage: str, prog_bar: bool) -> None:
        self._log_epoch_metrics(self.val_perplexity if stage == "val" else self.test_perplexity, prog_bar)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        if metrics["bleu"].update_called:
            self._log_epoch_metrics(metrics, prog_bar)

    def on_validation_epoch_end(self) -> None:
        self._log_stage("val", prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self._log_stage("test", prog_bar=False)

    def save_extras(self, directory: Path) -> None:
        """Also ``generation_config.json``: the decoding settings and the start / end / pad ids."""
        super().save_extras(directory)
        self.generation_config.save_pretrained(directory)
