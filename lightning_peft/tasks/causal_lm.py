"""``CausalGenerator``: instruction / chat tuning of decoder-only models (Llama, GPT-2, SmolLM, Qwen, …)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from peft import PeftConfig, PeftType, TaskType
from transformers import AutoModelForCausalLM

from lightning_peft.backbone import BackboneConfig
from lightning_peft.errors import LightningPeftError
from lightning_peft.tasks.generation import TextGenerator
from lightning_peft.training import TrainingConfig
from lightning_peft.types import IGNORE_INDEX, Batch


@contextmanager
def scored_positions_only(head: torch.nn.Module, scored: torch.Tensor) -> Iterator[None]:
    """While active, ``head`` (the LM head) runs only on the hidden states where ``scored`` (rows × positions) is
    true, and returns (scored positions, vocabulary) logits in row-major order. Over a 49k vocabulary the head is a
    large share of a decoder's step and memory; the loss needs it only where there is a label. Positions that a
    PEFT method prepends (prompt tuning's virtual tokens) are never scored.

    Example::

        with scored_positions_only(model.get_output_embeddings(), labels != -100):
            logits = model(input_ids=ids, use_cache=False).logits  # (number of labels, vocabulary)
    """

    def select(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        mask = scored
        if hidden.shape[1] > mask.shape[1]:
            mask = torch.cat([mask.new_zeros(mask.shape[0], hidden.shape[1] - mask.shape[1]), mask], dim=1)
        return (hidden[mask], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


class CausalGenerator(TextGenerator):
    """Instruction and chat tuning of a decoder-only ``AutoModelForCausalLM`` (with :class:`~lightning_peft.
    ChatDataModule`), or continued pre-training on plain text.

    Training minimises the next-token cross-entropy over the labelled tokens (assistant turns by default), computing
    the LM head only there (see :func:`scored_positions_only`); training batches are packed rows separated by their
    position ids (transformers' own route, see :class:`~lightning_peft.batching.PositionIdPacking`) where the model
    allows, checked on the first batch. Validation and test log ``loss`` and ``perplexity`` over the labelled tokens
    and, generating the last assistant turn of each conversation, ``bleu``, ``chrf`` and ``rouge1|2|L`` against it
    (see :class:`~lightning_peft.tasks.generation.TextGenerator`); predict writes ``{messages, prediction}`` records
    (``{text, prediction}`` for plain text). The best checkpoint is the lowest ``val/perplexity``.

    Activation checkpointing is on unless ``backbone.gradient_checkpointing`` says otherwise (or prefix tuning, which
    peft cannot checkpoint): a decoder's activations dominate a training step's memory (SmolLM2, batch 8: half the
    peak memory for 8 % of the speed).

    Args: see :class:`~lightning_peft.tasks.generation.TextGenerator` (``val_generation_batches`` is 2 here:
    generating with a decoder is slow).

    Example::

        from peft import LoraConfig
        model = CausalGenerator(
            backbone=BackboneConfig("models/SmolLM2-135M-Instruct"),
            peft=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
            generation={"max_new_tokens": 128},
        )
    """

    auto_model_class = AutoModelForCausalLM
    peft_task_type = TaskType.CAUSAL_LM
    pipeline_tag = "text-generation"
    packs_by_position_ids = True
    #: per-token entries: trimmed in micro-batches, moved with their tokens in packed rows
    sequence_keys = ("input_ids", "attention_mask", "labels", "target_ids")
    model_input_keys = ("input_ids", "attention_mask", "position_ids")

    def __init__(
        self,
        backbone: BackboneConfig,
        peft: PeftConfig | None = None,
        generation: dict[str, Any] | None = None,
        val_generation_batches: int | None = 2,
        metrics_lowercase: bool = False,
        generation_seed: int = 0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        training: TrainingConfig | None = None,
    ) -> None:
        super().__init__(backbone, peft, generation, val_generation_batches, metrics_lowercase, generation_seed,
                         optimizer, training)
        if self.backbone_config.gradient_checkpointing is None:  # measured on SmolLM2: half the memory, 8 % slower
            prefixes = self.peft_config is not None and self.peft_config.peft_type == PeftType.PREFIX_TUNING
            # peft refuses prefix tuning with checkpointing (its prefixes live in the attention caches)
            self.backbone_config = dataclasses.replace(self.backbone_config, gradient_checkpointing=not prefixes)
        self.build_backbone()
        config = self.generation_config
        if config.eos_token_id is None:
            raise LightningPeftError("model.backbone: the model defines no eos_token_id, so generation would never "
                                     "stop; set generation: {eos_token_id: …}")
        if config.pad_token_id is None:  # decoders often have none; padding with the end token is the convention
            eos = config.eos_token_id
            config.pad_token_id = eos[0] if isinstance(eos, list) else eos

    @classmethod
    def checkpoint_metric(cls, init_args: dict[str, Any]) -> tuple[str, str]:
        """The perplexity of the labelled tokens: exact over the whole validation set, unlike BLEU on a few batches."""
        return "val/perplexity", "min"

    # -- next-token loss --------------------------------------------------------------------------------
    def prepare_batch(self, batch: Batch) -> Batch:
        """Add ``target_ids``: each position's next labelled token (-100 where there is none), so that packing and
        micro-batches move targets with their positions."""
        labels = batch.get("labels")
        if labels is None or "target_ids" in batch:
            return batch
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]
        return {**batch, "target_ids": targets}

    @staticmethod
    def scored_positions(batch: Batch) -> torch.Tensor:
        """The positions with a next-token target (``target_ids`` ≠ -100): where :meth:`forward` computes logits."""
        return batch["target_ids"] != IGNORE_INDEX

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits (labelled positions, vocabulary) at the :meth:`scored_positions`, row-major."""
        with scored_positions_only(self.model.get_output_embeddings(), self.scored_positions(batch)):
            return self.model(**self.model_inputs(batch), use_cache=False).logits

    def compute_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        targets = batch["target_ids"][self.scored_positions(batch)]
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)

    def loss_weight(self, batch: Batch) -> int:
        return int(self.scored_positions(batch).sum())

    def token_scores(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return logits[None], batch["target_ids"][self.scored_positions(batch)][None]

    # -- generation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: Batch) -> list[str]:
        """The decoded continuations of the batch's (left-padded) prompts, with :attr:`generation_config`."""
        prompts = batch["prompt_input_ids"]
        sequences = self.model.generate(
            input_ids=prompts, attention_mask=batch["prompt_attention_mask"], generation_config=self.generation_config
        )
        texts = self.tokenizer.batch_decode(sequences[:, prompts.shape[1]:], skip_special_tokens=True)
        return [text.strip() for text in texts]

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict[str, Any]]:
        """One ``{messages, prediction}`` record per conversation (``{text, prediction}`` for plain text)."""
        predictions = self.seeded_generate(batch, batch_idx)
        key = "messages" if "messages" in batch else "text"
        return [{key: given, "prediction": prediction}
                for given, prediction in zip(batch[key], predictions, strict=True)]

    # -- export -----------------------------------------------------------------------------------------
    def loading_snippet(self, adapter_dir: Path) -> str:
        """peft's loader, with the export's generation settings (peft takes the base model's)."""
        return ("from peft import AutoPeftModelForCausalLM\nfrom transformers import GenerationConfig\n"
                f"model = AutoPeftModelForCausalLM.from_pretrained({str(adapter_dir)!r})\n"
                f"model.generation_config = GenerationConfig.from_pretrained({str(adapter_dir)!r})")

    def merged_loading_snippet(self, merged_dir: Path) -> str:
        """Plain transformers, through the text-generation pipeline (chat template and generation config included)."""
        return ("from transformers import pipeline\n"
                f"generator = pipeline('text-generation', model={str(merged_dir)!r})\n"
                "generator([{'role': 'user', 'content': 'Hello!'}])")
