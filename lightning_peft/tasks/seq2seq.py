"""``Seq2SeqGenerator``: translation / summarisation with a PEFT seq2seq model, generation metrics in evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from peft import PeftConfig, TaskType
from transformers import AutoConfig, AutoModelForSeq2SeqLM

from lightning_peft.backbone import BackboneConfig
from lightning_peft.errors import LightningPeftError
from lightning_peft.tasks.generation import TextGenerator
from lightning_peft.training import TrainingConfig
from lightning_peft.types import IGNORE_INDEX, Batch

#: written beside a warm-started encoder-decoder's adapter: the encoder and decoder checkpoints of its base
WARM_START_FILE = "encoder_decoder.json"


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


class Seq2SeqGenerator(TextGenerator):
    """Sequence-to-sequence generation (translation, summarisation) with any ``AutoModelForSeq2SeqLM`` or an
    ``EncoderDecoderModel`` warm-started from encoder checkpoints (``backbone.decoder_pretrained_model_name_or_path``).

    Training minimises the teacher-forced cross-entropy over target tokens (padding ignored). Evaluation and
    generation metrics: see :class:`~lightning_peft.tasks.generation.TextGenerator`; predict returns
    ``{source, prediction}`` records.

    Labels must not begin with the decoder start token, which the model prepends itself; a leading one (BERT-style
    tokenizers start every text with ``[CLS]``, the start token of a warm-started BERT decoder) is dropped.

    Args: see :class:`~lightning_peft.tasks.generation.TextGenerator`.

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
        generation_seed: int = 0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        training: TrainingConfig | None = None,
    ) -> None:
        super().__init__(backbone, peft, generation, val_generation_batches, metrics_lowercase, generation_seed,
                         optimizer, training)
        check_generation_head(self.backbone_config)
        self.build_backbone()
        if self.generation_config.decoder_start_token_id is None and self.generation_config.bos_token_id is None:
            raise LightningPeftError(
                "model.backbone: the model defines no decoder_start_token_id; set it in backbone.model_config"
            )

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
        """Also, for a warm-started encoder-decoder (whose adapter config names no base), ``encoder_decoder.json``
        with the encoder and decoder checkpoints the base is rebuilt from (``lightning-peft serve`` reads it)."""
        super().save_extras(directory)
        decoder = self.backbone_config.decoder_pretrained_model_name_or_path
        if decoder is not None:
            sources = {"encoder": self.backbone_config.pretrained_model_name_or_path, "decoder": decoder}
            (directory / WARM_START_FILE).write_text(json.dumps(sources, indent=2) + "\n")

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

    def token_scores(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return logits, batch["labels"]

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict[str, Any]]:
        """One ``{source, prediction}`` record per example."""
        predictions = self.seeded_generate(batch, batch_idx)
        return [
            {"source": source, "prediction": prediction}
            for source, prediction in zip(batch["source"], predictions, strict=True)
        ]
