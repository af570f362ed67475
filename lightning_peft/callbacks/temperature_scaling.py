"""``TemperatureScaling``: after fit, one softmax temperature fitted on the validation set (LBFGS on NLL)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_peft.calibration import fit_temperature
from lightning_peft.checkpoints import load_checkpoint
from lightning_peft.errors import LightningPeftError
from lightning_peft.export import atomic_file, weights_from
from lightning_peft.types import CalibratedTask

TEMPERATURE_KEY = "temperature"  # state-dict entry of the task's temperature buffer


class TemperatureScaling(Callback):
    """Calibrates a single-label classifier after training (Guo et al., 2017): the temperature ``T`` minimising the
    validation NLL of ``softmax(logits / T)``, fitted by LBFGS on the logits of the full validation split.

    ``T`` is fitted for the weights that are tested and exported: those of the best checkpoint when a
    ``ModelCheckpoint`` kept one (that checkpoint file is then rewritten, atomically, with ``T`` in it), else the
    final weights. It runs at train end, before any export callback, so ``AdapterExport`` writes it too
    (``adapter/calibration.json``). Predictions divide the logits by ``T``; tests report the calibration metrics
    before and after it (``test/ece`` and ``test/ece_scaled``, …). Logged: ``calibration/temperature``,
    ``calibration/val_nll_before`` and ``…_after``. Every process fits on the whole split, so all agree under DDP.

    Args:
        max_iter: LBFGS iterations.

    Example::

        trainer = Trainer(callbacks=[TemperatureScaling(), AdapterExport()])
    """

    def __init__(self, max_iter: int = 100) -> None:
        if max_iter < 1:
            raise LightningPeftError(f"TemperatureScaling.max_iter: must be a positive integer, got {max_iter}")
        self.max_iter = max_iter

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, CalibratedTask) or not pl_module.is_single_label:
            raise LightningPeftError(
                "TemperatureScaling: calibrates single-label classifiers (SequenceClassifier with problem_type "
                f"single_label_classification), not {type(pl_module).__name__}"
            )
        datasets = getattr(trainer.datamodule, "datasets", None)
        if datasets is not None and "validation" not in datasets:
            raise LightningPeftError(
                "TemperatureScaling: needs a validation split to fit the temperature on; set data.validation_file "
                "(or a data.dataset_name with a validation split) or remove the callback"
            )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
        if best and Path(best).is_file():
            with weights_from(pl_module, load_checkpoint(best, "TemperatureScaling: best checkpoint")):
                logits, labels = self.validation_logits(trainer, pl_module)
        else:
            logits, labels = self.validation_logits(trainer, pl_module)
        temperature = fit_temperature(logits, labels, self.max_iter)
        pl_module.temperature.fill_(temperature)
        before, after = F.cross_entropy(logits, labels).item(), F.cross_entropy(logits / temperature, labels).item()
        rank_zero_info(
            f"TemperatureScaling: T = {temperature:.4f} fitted on {len(labels)} validation examples "
            f"(NLL {before:.4f} → {after:.4f})" + (f", for the weights of {best}" if best else "")
        )
        metrics = {"calibration/temperature": temperature, "calibration/val_nll_before": before,
                   "calibration/val_nll_after": after}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if best and trainer.is_global_zero:
            store_temperature(Path(best), temperature)
        trainer.strategy.barrier("temperature_scaling")

    @staticmethod
    @torch.no_grad()
    def validation_logits(trainer: Trainer, pl_module: LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (before any temperature) and labels of the whole validation split, in evaluation mode."""
        dataloader = trainer.datamodule.val_dataloader() if trainer.datamodule else trainer.val_dataloaders
        if isinstance(dataloader, (list, tuple)):
            dataloader = dataloader[0]
        was_training = pl_module.training
        pl_module.eval()
        logits, labels = [], []
        try:
            for batch in dataloader:
                batch = move_data_to_device(batch, pl_module.device)
                logits.append(pl_module(batch).float().cpu())
                labels.append(batch["labels"].cpu())
        finally:
            pl_module.train(was_training)
        if not logits:
            raise LightningPeftError("TemperatureScaling: the validation split is empty; nothing to fit on")
        return torch.cat(logits), torch.cat(labels)


def store_temperature(checkpoint_path: Path, temperature: float) -> None:
    """Write ``temperature`` into a Lightning checkpoint's state dict, atomically (temporary file + rename)."""
    checkpoint = load_checkpoint(checkpoint_path, "TemperatureScaling: checkpoint")
    checkpoint["state_dict"][TEMPERATURE_KEY] = torch.tensor(temperature)
    with atomic_file(checkpoint_path) as tmp:
        torch.save(checkpoint, tmp)
