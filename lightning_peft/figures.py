"""Figures saved next to the run and sent to the loggers that take images: AdaLoRA ranks, calibration reports,
local sweep plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info


class StandaloneFigures:
    """The one part of ``pyplot`` our figures use, ``subplots``, without pyplot's process-wide state (its backend
    and figure registry, which a notebook or the user's program owns): each figure is a standalone
    ``matplotlib.figure.Figure``, saved through its own canvas.

    Example::

        figure, axes = StandaloneFigures.subplots(figsize=(4, 3))
    """

    @staticmethod
    def subplots(*args: Any, figsize: tuple[float, float] | None = None, **kwargs: Any) -> tuple[Any, Any]:
        from matplotlib.figure import Figure

        figure = Figure(figsize=figsize)
        return figure, figure.subplots(*args, **kwargs)


def plotting(owner: str) -> type[StandaloneFigures] | None:
    """:class:`StandaloneFigures`, or ``None`` (saying so) when matplotlib is not installed."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        rank_zero_info(f"{owner}: matplotlib is not installed, so no figure (pip install 'lightning-peft[plots]')")
        return None
    return StandaloneFigures


def save_figure(trainer: Trainer | None, figure: Any, path: Path, key: str) -> Path:
    """Save ``figure`` as PNG at ``path`` and log it under ``key`` to every logger of ``trainer`` (if any) that takes
    images (W&B, Neptune, Comet through ``log_image``; TensorBoard through ``add_figure``); close it, return ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    for logger in trainer.loggers if trainer is not None else []:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[str(path)])
        elif hasattr(getattr(logger, "experiment", None), "add_figure"):
            logger.experiment.add_figure(key, figure, global_step=trainer.global_step)
    return path


def reliability_diagram(curves: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Any:
    """Accuracy against confidence per bin for each named set of :func:`~lightning_peft.calibration.reliability_bins`
    (e.g. before and after temperature scaling), with the diagonal of perfect calibration."""
    plt = plotting("reliability diagram")
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for name, (confidence, accuracy, counts) in curves.items():
        used = counts > 0
        axes.plot(confidence[used].numpy(), accuracy[used].numpy(), marker="o", label=name)
    axes.set(xlabel="confidence (top label)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="Reliability")
    axes.legend(loc="upper left", fontsize=8)
    return figure


def accuracy_coverage_curve(coverage: torch.Tensor, accuracy: torch.Tensor, aurc: float) -> Any:
    """Accuracy of the kept examples against the fraction kept, most confident first."""
    plt = plotting("accuracy-coverage curve")
    figure, axes = plt.subplots(figsize=(4.5, 3.5))
    axes.plot(coverage.numpy(), accuracy.numpy())
    axes.set(xlabel="coverage (most confident first)", ylabel="accuracy of kept examples", xlim=(0, 1),
             title=f"Selective prediction (AURC {aurc:.4f})")
    axes.grid(alpha=0.3)
    return figure
