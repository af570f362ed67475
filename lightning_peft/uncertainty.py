"""Predictive uncertainty at inference: MC dropout, adapter ensembles, abstention."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightning_peft.errors import LightningPeftError
from lightning_peft.export import adapter_directory

CALIBRATION_FILE = "calibration.json"  # written beside an exported adapter: {"temperature": T, …}


@dataclass
class PredictionOptions:
    """How ``predict`` turns a classifier's outputs into records.

    Args:
        mc_samples: Monte-Carlo dropout: run each example this many times with dropout on (in the adapters and the
            backbone) and report the mean probability, the predictive entropy and the per-class standard deviation.
            ``null``: one deterministic pass.
        abstain_below: selective prediction: when the top probability is below this, the record's ``label`` is
            ``null`` and ``abstained`` is true (``predicted`` keeps the top label).
        ensemble: exported adapter directories (``…/export/adapter``) over the same base model and labels; their
            probabilities, each with its own temperature (``calibration.json``), are averaged. The model's own
            adapter is not used when this is set. Cheap with PEFT: one frozen base, N small adapters.

    Example::

        SequenceClassifier(backbone, peft, labels, prediction=PredictionOptions(mc_samples=20, abstain_below=0.7))

    or on the command line: ``lightning-peft predict … --model.init_args.prediction.mc_samples 20``.
    """

    mc_samples: int | None = None
    abstain_below: float | None = None
    ensemble: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mc_samples is not None and self.mc_samples < 1:
            raise LightningPeftError(
                f"model.prediction.mc_samples: must be a positive number of dropout samples or null, "
                f"got {self.mc_samples}"
            )
        if self.abstain_below is not None and not 0.0 < self.abstain_below <= 1.0:
            raise LightningPeftError(f"model.prediction.abstain_below: must be in (0, 1], got {self.abstain_below}")
        self.ensemble = [ensemble_member(str(path)) for path in self.ensemble]

    @property
    def is_default(self) -> bool:
        return self.mc_samples is None and self.abstain_below is None and not self.ensemble


def ensemble_member(path: str) -> str:
    """The adapter directory of an export given as its root (``<export>/adapter``, as ``serve --adapters`` takes it)
    or as ``adapter/`` itself."""
    directory = adapter_directory(path)
    if not (directory / "adapter_config.json").is_file():
        raise LightningPeftError(
            f"model.prediction.ensemble: {path} is not an export (no adapter/adapter_config.json or "
            "adapter_config.json); give a directory that `lightning-peft export` or AdapterExport wrote"
        )
    return str(directory)


def as_prediction_options(value: PredictionOptions | dict | None) -> PredictionOptions:
    if value is None:
        return PredictionOptions()
    return PredictionOptions(**value) if isinstance(value, dict) else value


@contextmanager
def dropout_on(module: torch.nn.Module) -> Iterator[None]:
    """Within the block, every ``torch.nn.Dropout`` in ``module`` (adapter and backbone dropout) is in training mode;
    each module's own mode is restored after."""
    dropouts = [m for m in module.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    modes = [m.training for m in dropouts]
    for m in dropouts:
        m.train()
    try:
        yield
    finally:
        for m, mode in zip(dropouts, modes, strict=True):
            m.train(mode)


def summarise_samples(probabilities: torch.Tensor) -> dict[str, torch.Tensor]:
    """From per-sample probabilities ``[S, B, C]``: ``mean`` ``[B, C]``, predictive ``entropy`` ``[B]`` (of the mean,
    in nats) and per-class ``std`` ``[B, C]`` over the S samples (0 for one sample)."""
    mean = probabilities.mean(0)
    entropy = -(mean * mean.clamp_min(1e-12).log()).sum(-1)
    std = probabilities.std(0, unbiased=False)
    return {"mean": mean, "entropy": entropy, "std": std}


def adapter_temperature(adapter_dir: str | Path) -> float:
    """The temperature stored with an exported adapter (1.0 when it was not calibrated)."""
    path = Path(adapter_dir) / CALIBRATION_FILE
    return float(json.loads(path.read_text())["temperature"]) if path.is_file() else 1.0
