"""``Seq2SeqGenerator``: translation / summarisation with a PEFT seq2seq model, generation metrics in evaluation."""

from __future__ import annotations

import copy
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from peft import PeftConfig, TaskType
from torchmetrics import MetricCollection
from transformers import AutoConfig, AutoModelForSeq2SeqLM, GenerationConfig, PreTrainedTokenizerBase

from lightning_peft.backbone import BackboneConfig, load_tokenizer
from lightning_peft.errors import LightningPeftError
from lightning_peft.metrics.generation import generation_metrics
from lightning_peft.tasks.base import PeftModule
from lightning_peft.training import TrainingConfig
from lightning_peft.types import IGNORE_INDEX, Batch

DEFAULT_MAX_NEW_TOKENS = 128


def check_generation_head(spec: BackboneConfig) -> None:
    """Refuse, with the fix, a backbone that cannot generate text from a source (an encoder- or decoder-only
    checkpoint given without ``decoder_pretrained_model_name_or_path``)."""
    if spec.decoder_pretrained_model_name_or_path:
        return
    if spec.is_pretrained:
        try:
            config = AutoConfig.from_pretrained(
                spec.pretrained_model_name_or_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
            )
        except (OSError, ValueError):
            return  # the loader reports an unreadable backbone with its own message
    else:
        config = AutoConfig.for_model(**spec.model_config) if "model_type" in spec.model_config else None
    if config is not None and not getattr(config, "is_encoder_decoder", False):
        where = spec.pretrained_model_name_or_path or "model_config"
        raise LightningPeftError(
            f"model.backbone: {where!r} is a {config.model_type} model without a generation head for seq2seq "
            "(not an encoder-decoder). Use a seq2seq checkpoint (T5, BART, Marian, mT5, …), or warm-start an "
            "encoder-decoder from it by setting backbone.decoder_pretrained_model_name_or_path"
        )


def build_generation_config(base: GenerationConfig, overrides: dict[str, Any]) -> GenerationConfig:
    """``base`` (the model's generation defaults) updated with ``overrides``, checked by transformers; without a
    length limit in either, ``max_new_tokens`` is 128 (transformers' own default of 20 tokens cuts most outputs)."""
    known = set(GenerationConfig().to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise LightningPeftError(
            f"model.generation: unknown option {unknown[0]!r}; use GenerationConfig fields such as num_beams, "
            "max_new_tokens, length_penalty, no_repeat_ngram_size, do_sample"
        )
    config = copy.deepcopy(base)
    try:
        config.update(**overrides)
    except ValueError as err:
        raise LightningPeftError(f"model.generation: {str(err).strip().splitlines()[0]}") from err
    if "max_length" not in overrides and "max_new_tokens" not in overrides and config.max_new_tokens is None:
        config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    if config.num_return_sequences not in (None, 1):
        raise LightningPeftError(
            "model.generation.num_return_sequences: one output per source is written and scored; set it to 1"
        )
    try:
        config.validate(strict=True)
    except ValueError as err:
        raise LightningPeftError(f"model.generation: {str(err).strip().splitlines()[0]}") from err
    if config.decoder_start_token_id is None and config.bos_token_id is None:
        raise LightningPeftError(
            "model.backbone: the model defines no decoder_start_token_id; set it in backbone.model_config"
        )
    return config


class Seq2SeqGenerator(PeftModule):
    """Sequence-to-sequence generation (translation, summarisation) with any ``AutoModelForSeq2SeqLM`` or an
    ``EncoderDecoderModel`` warm-started from encoder checkpoints (``backbone.decoder_pretrained_model_name_or_path``).

    Training minimises the teacher-forced cross-entropy over target tokens (padding ignored). Validation logs
    ``val/loss`` on every batch and generates on ``val_generation_batches`` batches spread over the (length-sorted)
    validation set for ``val/bleu``, ``val/chrf``, ``val/rouge1|2|L``; test generates on every batch; predict
    returns ``{source, prediction}`` records.

    Labels must not begin with the decoder start token, which the model prepends itself; a leading one (BERT-style
    tokenizers start every text with ``[CLS]``, the start token of a warm-started BERT decoder) is dropped.

    Args:
        generation: ``transformers.GenerationConfig`` options (``num_beams``, ``max_new_tokens``, ``length_penalty``,
            ``no_repeat_ngram_size``, …) over the model's own defaults.
        val_generation_batches: how many validation batches to generate on per validation run (``null``: all).
        metrics_lowercase: compute BLEU and chrF case-insensitively.
        Other arguments: see :class:`~lightning_peft.tasks.base.PeftModule`.

    Example::

        from peft import LoraConfig
        model = Seq2SeqGenerator(
            backbone=BackboneConfig("t5-small"),
            peft=LoraConfig(r=8, lora_alpha=16),  # target_modules: peft's default for T5 (q, v)
            generation={"num_beams": 4, "max_new_tokens": 64},
        )
    """

    auto_model_class = AutoModelForSeq2SeqLM
    peft_task_type = TaskType.SEQ_2_SEQ_LM
    pipeline_tag = "text2text-generation"
    sequence_keys = ("input_ids", "attention_mask")
    supports_sequence_packing = False  # the decoder's cross-attention would need per-example encoder masks

    def __init__(
        self,
        backbone: BackboneConfig,
        peft: PeftConfig | None = None,
        generation: dict[str, Any] | None = None,
        val_generation_batches: int | None = 8,
        metrics_lowercase: bool = False,
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
        check_generation_head(self.backbone_config)
        self.build_backbone()
        self.generation_config = build_generation_config(self.model.generation_config, dict(generation or {}))

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """Decodes generated ids; the same tokenizer the datamodule encodes with (the backbone's)."""
        return load_tokenizer(self.backbone_config.tokenizer_name_or_path, "model.backbone.tokenizer")

    def build_metrics(self) -> MetricCollection:
        return generation_metrics(lowercase=self.metrics_lowercase)

    # -- teacher-forced loss ----------------------------------------------------------------------------
    @property
    def decoder_start_token_id(self) -> int | None:
        return self.generation_config.decoder_start_token_id

    def prepare_batch(self, batch: Batch) -> Batch:
        """Drop a leading decoder start token from the labels (the model prepends it to the decoder inputs)."""
        labels = batch.get("labels")
        start = self.decoder_start_token_id
        if labels is not None and labels.shape[1] > 1 and start is not None and bool((labels[:, 0] == start).all()):
            return {**batch, "labels": labels[:, 1:]}
        return batch

    def forward(self, batch: Batch) -> torch.Tensor:
        """Next-token logits over the target positions (teacher forcing on ``labels``)."""
        decoder_input_ids = self.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=decoder_input_ids
        ).logits

    def compute_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(
            logits.flatten(0, 1).float(), batch["labels"].flatten(),
            ignore_index=IGNORE_INDEX, label_smoothing=self.label_smoothing,
        )

    def loss_weight(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def micro_batch(self, batch: Batch, rows: torch.Tensor, width: int) -> Batch:
        chunk = super().micro_batch(batch, rows, width)
        target_width = max(int((chunk["labels"] != IGNORE_INDEX).sum(1).max()), 1)
        chunk["labels"] = chunk["labels"][:, :target_width]
        return chunk

    def save_extras(self, directory: Path) -> None:
        """Also ``generation_config.json``: the decoding settings and the decoder start / end / pad ids."""
        super().save_extras(directory)
        self.generation_config.save_pretrained(directory)

    def loading_snippet(self, adapter_dir: Path) -> str:
        """For a warm-started encoder-decoder, rebuild the base from its two checkpoints, then add the adapter."""
        decoder = self.backbone_config.decoder_pretrained_model_name_or_path
        if decoder is None:
            return super().loading_snippet(adapter_dir)
        encoder = self.backbone_config.pretrained_model_name_or_path
        return (
            "from peft import PeftModel; from transformers import EncoderDecoderModel\n"
            f"model = PeftModel.from_pretrained(EncoderDecoderModel.from_encoder_decoder_pretrained({encoder!r}, "
            f"{decoder!r}), {str(adapter_dir)!r})"
        )

    # -- generation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: Batch) -> list[str]:
        """Decoded outputs for the batch's sources, with :attr:`generation_config`."""
        sequences = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            generation_config=self.generation_config,
        )
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=True, clean_up_tokenization_spaces=True)

    def update_metrics(self, metrics: MetricCollection, logits: torch.Tensor, batch: Batch) -> None:
        metrics.update(self.generate(batch), [[reference] for reference in batch["reference"]])

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
        metrics = self.val_metrics if self.generates_in_validation(batch_idx) else None
        self._evaluation_step(batch, "val", metrics)

    def on_validation_epoch_end(self) -> None:
        if self.val_metrics["bleu"].update_called:
            self._log_epoch_metrics(self.val_metrics, prog_bar=True)

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict[str, Any]]:
        """One ``{source, prediction}`` record per example."""
        predictions = self.generate(batch)
        return [
            {"source": source, "prediction": prediction}
            for source, prediction in zip(batch["source"], predictions, strict=True)
        ]
