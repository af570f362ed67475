"""Adapter-only checkpoints: what a task keeps of Lightning's checkpoint, and the checks when one is loaded back.

A checkpoint holds plain hyper-parameters (so it loads with ``torch.load(weights_only=True)``), the trainable
weights (adapter and head) plus the task's own buffers, AdaLoRA's learnt ranks and the latest ``val/`` metrics; the
frozen base is rebuilt from the backbone config. A randomly initialised base cannot be rebuilt, so it is kept whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from transformers.utils.quantization_config import QuantizationConfigMixin

from lightning_peft.errors import LightningPeftError
from lightning_peft.quantization import plain_quantization

RANK_PATTERN_KEY = "rank_pattern"  # checkpoint entry: AdaLoRA's learnt ranks
METRICS_KEY = "metrics"  # checkpoint entry: the val/ metrics logged when it was written
#: prefixes that FSDP and activation checkpointing put in front of wrapped modules' parameter names
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def plain_hyperparameters(hparams: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameters as plain data, so checkpoints load with ``torch.load(weights_only=True)``.

    Backbone, training and PEFT configs become dicts (the constructor accepts those); other objects, such as an
    optimizer factory, are dropped, so ``load_from_checkpoint`` falls back to their defaults (a resumed fit restores
    the optimizer from its saved state anyway).
    """
    plain = {}
    for key, value in hparams.items():
        if isinstance(value, os.PathLike):  # a pathlib.Path given from Python: torch.load(weights_only) refuses it
            value = os.fspath(value)
        if isinstance(value, PeftConfig):
            value = json.loads(json.dumps(value.to_dict(), default=list))
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):  # BackboneConfig, TrainingConfig
            value = {field.name: _plain_field(getattr(value, field.name)) for field in dataclasses.fields(value)}
        elif not _is_plain(value):
            continue
        plain[key] = value
    return plain


def _plain_field(value: Any) -> Any:
    """A config dataclass's field as plain data: a quantisation config as the dict ``config.json`` holds, a path as
    a string."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, QuantizationConfigMixin):
        return plain_quantization(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def validation_metrics(callback_metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """The scalar ``val/`` metrics among a trainer's ``callback_metrics``: what checkpoints and model cards state."""
    return {name: float(value) for name, value in callback_metrics.items()
            if name.startswith("val/") and value.numel() == 1}


def clean_tensor_name(name: str) -> str:
    """``name`` as the unwrapped module calls it: what checkpoints hold (torch's own helper is private)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def trainable_state_keys(module: torch.nn.Module) -> set[str]:
    """State-dict names of the trainable weights, without FSDP / activation-checkpointing wrapper prefixes
    (under FSDP, ``named_parameters`` sees the wrappers but checkpoints hold the original names)."""
    return {clean_tensor_name(name) for name, param in module.named_parameters() if param.requires_grad}


def task_buffer_keys(module: torch.nn.Module) -> set[str]:
    """State-dict names of the task's own buffers (outside the transformer ``model``, e.g. a fitted temperature)."""
    return {clean_tensor_name(name) for name, _ in module.named_buffers() if not name.startswith("model.")}


def rank_pattern(model: torch.nn.Module) -> dict[str, Any] | None:
    """The active adapter's ``rank_pattern`` (AdaLoRA's learnt ranks), ``None`` without one."""
    config = model.active_peft_config if isinstance(model, PeftModel) else None
    return getattr(config, "rank_pattern", None)


def set_rank_pattern(model: torch.nn.Module, value: dict[str, Any] | None) -> None:
    """Give the active adapter ``value`` as its ``rank_pattern`` (nothing for ``None`` or a non-PEFT model)."""
    if value is not None and isinstance(model, PeftModel):
        model.active_peft_config.rank_pattern = value


def adapter_only_checkpoint(
    module: torch.nn.Module, checkpoint: dict[str, Any], metrics: dict[str, float] | None, keep_base: bool = False
) -> None:
    """Reduce Lightning's ``checkpoint`` of ``module`` (whose transformer is ``module.model``) in place: add the rank
    pattern and ``metrics``, and — unless ``keep_base`` — keep only the trainable weights and the task's buffers."""
    pattern = rank_pattern(module.model)
    if pattern:
        checkpoint[RANK_PATTERN_KEY] = pattern
    if metrics is not None:
        checkpoint[METRICS_KEY] = metrics
    if keep_base:
        return
    keep = trainable_state_keys(module) | task_buffer_keys(module)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}


def check_and_restore(module: torch.nn.Module, checkpoint: dict[str, Any]) -> None:
    """Refuse a checkpoint whose weights do not fit ``module`` (one clear error instead of a size-mismatch
    traceback from ``load_state_dict``); restore AdaLoRA's rank pattern."""
    state = checkpoint.get("state_dict", {})
    missing = sorted(trainable_state_keys(module) - set(state))
    if missing:
        raise LightningPeftError(
            f"checkpoint lacks {len(missing)} trainable weights of this model (e.g. {missing[0]!r}): "
            "it was written for a different model, PEFT method or label set"
        )
    set_rank_pattern(module.model, checkpoint.get(RANK_PATTERN_KEY))
    own = module.state_dict()
    for name, value in state.items():
        if name in own and isinstance(value, torch.Tensor) and value.shape != own[name].shape:
            raise LightningPeftError(
                f"checkpoint weight {name!r} has shape {tuple(value.shape)} but this model's has "
                f"{tuple(own[name].shape)}: it was written for a different model, PEFT method or label set"
            )
