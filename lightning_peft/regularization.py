"""Training-loss regularisers shared by every task: label smoothing, R-Drop and L2 on the trainable weights."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lightning_peft.errors import LightningPeftError


@dataclass
class Regularization:
    """Regularisers of the training loss; each is off at 0. Evaluation losses never include them.

    Args:
        label_smoothing: cross-entropy label smoothing ε (targets ``1 − ε`` on the gold class, ``ε/K`` spread over
            all K classes), for classification, tagging and seq2seq.
        rdrop_alpha: R-Drop weight α: each training example runs through the model twice (two dropout masks, one
            forward over the doubled batch) and the loss is the mean of both task losses plus
            ``α · ½(KL(p₁‖p₂) + KL(p₂‖p₁))``, averaged over the loss's own units (examples, labelled tokens).
        trainable_l2: weight α of ``α · Σ‖θ‖²`` over the trainable parameters only (the adapter and head, never the
            frozen base) — the ``L + α·R(θ)`` robust-loss form, unlike AdamW's decoupled weight decay.

    Example::

        TrainingConfig(regularization=Regularization(label_smoothing=0.1, rdrop_alpha=1.0))

    or in YAML: ``model.init_args.training.regularization: {label_smoothing: 0.1, rdrop_alpha: 1.0}``.
    """

    label_smoothing: float = 0.0
    rdrop_alpha: float = 0.0
    trainable_l2: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise LightningPeftError(
                "model.init_args.training.regularization.label_smoothing: must be in [0, 1), "
                f"got {self.label_smoothing}"
            )
        for name in ("rdrop_alpha", "trainable_l2"):
            if getattr(self, name) < 0:
                raise LightningPeftError(
                    f"model.init_args.training.regularization.{name}: must be >= 0, got {getattr(self, name)}"
                )


def as_regularization(value: Regularization | dict[str, Any] | None) -> Regularization:
    if value is None:
        return Regularization()
    return Regularization(**value) if isinstance(value, dict) else value


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``½(KL(p_a‖p_b) + KL(p_b‖p_a))`` of the categorical distributions over the last dimension, averaged over the
    other positions (those where ``mask`` is true, when given)."""
    log_a, log_b = F.log_softmax(logits_a.float(), -1), F.log_softmax(logits_b.float(), -1)
    per_position = 0.5 * ((log_a.exp() * (log_a - log_b)).sum(-1) + (log_b.exp() * (log_b - log_a)).sum(-1))
    if mask is not None:
        per_position = per_position[mask]
    return per_position.mean() if per_position.numel() else per_position.sum()


def kl_to_target(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_target‖p)`` of the categorical distributions over the last dimension, averaged over the other
    positions, with ``p_target`` a fixed target: no gradient flows into ``target_logits`` (UDA's consistency term)."""
    log_target = F.log_softmax(target_logits.detach().float(), -1)
    per_position = F.kl_div(F.log_softmax(logits.float(), -1), log_target, reduction="none", log_target=True).sum(-1)
    return per_position.mean()


def squared_l2(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """``Σ‖θ‖²`` over the parameters that require gradients."""
    return torch.stack([p.float().pow(2).sum() for p in parameters if p.requires_grad]).sum()
