"""Shared vocabulary every layer may import (data, tasks, callbacks): it imports nothing of lightning-peft."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import torch

#: label of positions no loss is computed on (padding, non-first sub-tokens, prompt tokens)
IGNORE_INDEX = -100

#: what a classification head predicts; the datamodule discovers it and the CLI passes it to the model
ProblemType = Literal["single_label_classification", "multi_label_classification", "regression"]

#: a collated batch: model inputs as tensors, plus raw columns (texts, words) passed through as lists
Batch = dict[str, Any]

#: a term added to the training loss: called with the (prepared) batch and the task loss
LossTerm = Callable[[Batch, torch.Tensor], torch.Tensor]


class AttributionTarget(NamedTuple):
    """One decision of a task that ``explain`` attributes to the input tokens."""

    name: str  #: what the report calls it, e.g. ``positive (logit)`` or ``PER: Ada Lovelace``
    score: Callable[[torch.Tensor], torch.Tensor]  #: logits [B, …] → the explained score [B]
    rows: list[int]  #: token positions whose attention rollout is reported
    entity: dict[str, Any] | None = None  #: a tagger's entity (type, start, end, text)


# -- what callbacks ask of a task or a datamodule (checked with isinstance, so callbacks need not import tasks/) --
@runtime_checkable
class ExportableTask(Protocol):
    """A task that writes its model in Hugging Face formats (``PeftModule.export``)."""

    def export(self, directory: str | Path, tokenizer: Any | None = None, merge: bool = False,
               **facts: Any) -> Path: ...


@runtime_checkable
class LossTermTask(Protocol):
    """A task whose training loss takes extra terms and whose input embeddings can be hooked (adversarial training)."""

    loss_terms: dict[str, LossTerm]

    def input_embedding_layers(self, owner: str) -> list[torch.nn.Module]: ...

    def batch_loss(self, batch: Batch) -> torch.Tensor: ...


@runtime_checkable
class CalibratedTask(Protocol):
    """A task whose class probabilities are ``softmax(logits / temperature)`` (temperature scaling)."""

    temperature: torch.Tensor

    @property
    def is_single_label(self) -> bool: ...


@runtime_checkable
class TokenizedData(Protocol):
    """A datamodule with a tokenizer and the facts a model card states about its data (``TextDataModule``)."""

    tokenizer: Any

    def card_facts(self) -> dict[str, Any]: ...


class ExplainableTask(Protocol):
    """What ``lightning_peft.explain`` asks of a task (``PeftModule`` has it; tasks with attributions override the two
    explanation hooks)."""

    model: torch.nn.Module
    sequence_keys: tuple[str, ...]
    device: torch.device

    def __call__(self, batch: Batch) -> torch.Tensor: ...

    def eval(self) -> Any: ...

    def input_embeddings(self, owner: str) -> torch.nn.Module: ...

    def explanation_encoding(self, tokenizer: Any, text: str, max_length: int) -> Any: ...

    def attribution_targets(self, logits: torch.Tensor, encoding: Any, text: str,
                            target: str | None) -> tuple[dict[str, Any], list[AttributionTarget]]: ...

#: batch entry of a training batch that holds each row and then its augmented view (``augmentation.consistency``):
#: per example, the weight of the symmetric KL between the two views' predictions
CONSISTENCY = "consistency"
