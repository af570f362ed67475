"""``EarlyStopping``: Lightning's, on the metric the checkpoint callback monitors unless told otherwise."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping
from lightning.pytorch.utilities import rank_zero_info


class EarlyStopping(LightningEarlyStopping):
    """Lightning's ``EarlyStopping``; with ``monitor`` left out it follows the checkpoint callback's ``monitor`` and
    ``mode`` (``val/accuracy`` → max, ``val/loss`` → min), so the run stops on the metric that picks the best
    checkpoint. ``patience`` counts validation runs (several per epoch with ``val_check_interval < 1``).

    Example::

        trainer = Trainer(callbacks=[ModelCheckpoint(monitor="val/f1", mode="max"), EarlyStopping(patience=3)])
    """

    def __init__(
        self,
        monitor: str | None = None,
        mode: Literal["min", "max"] | None = None,
        patience: int = 3,
        min_delta: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(monitor=monitor or "val/loss", mode=mode or "min", patience=patience, min_delta=min_delta,
                         **kwargs)
        self.follows_checkpoint = monitor is None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        checkpoint = trainer.checkpoint_callback
        if self.follows_checkpoint and getattr(checkpoint, "monitor", None):
            self.monitor, self.mode = checkpoint.monitor, checkpoint.mode
            self.min_delta = abs(self.min_delta) * (1 if self.mode == "max" else -1)
            self.best_score = torch.tensor(float("inf") if self.mode == "min" else float("-inf"))
            rank_zero_info(f"early stopping on {self.monitor} ({self.mode}), patience {self.patience} validation runs")
