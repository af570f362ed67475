"""``AdapterExport``: write the best adapter (and optionally a merged model) with a model card when a fit ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from lightning_peft.adapter_checkpoint import validation_metrics
from lightning_peft.errors import LightningPeftError
from lightning_peft.export import check_compressible, check_replaceable, export_checkpoint, push_export
from lightning_peft.types import ExportableTask, TokenizedData

EXPORT_DIR = "export"
FIELD = "AdapterExport.dirpath"  # how errors about the export directory name it


class AdapterExport(Callback):
    """Exports the **best** checkpoint's weights at fit end: ``adapter/``, optionally ``merged/``, and ``README.md``
    (see :meth:`PeftModule.export <lightning_peft.tasks.base.PeftModule.export>`), written atomically, so an
    earlier export is replaced whole or not at all.

    "Best" is the checkpoint callback's ``best_model_path`` (``best.ckpt`` in our configs); without one (no
    checkpointing, or no validation) the weights the fit ended with are exported. ``on_best`` also exports each
    time a new best checkpoint is saved, so a run stopped early or killed still leaves its best export behind.

    Args:
        dirpath: where to write; default ``<trainer.default_root_dir>/export``.
        merge: also write ``merged/``, a full model for plain ``transformers`` (methods that cannot merge, such as
            prompt tuning, say so in the log and the model card instead).
        on_best: export on every new best checkpoint as well as at fit end.
        overwrite: replace ``dirpath`` even when it holds something other than an earlier export; by default such a
            directory (or a file at that path) stops the fit before training, with an error naming it.
        push_to_hub: a Hub repo id: the fit-end export is also uploaded there (created if needed; see
            :func:`~lightning_peft.export.push_export`), from the global-zero process.
        private: create the ``push_to_hub`` repo private.
        quantize: ``"int8"``: the fit-end export also holds ``int8/`` (encoder tasks; see
            :mod:`~lightning_peft.compressed`), as ``lightning-peft export --quantize int8``.
        onnx: the fit-end export also holds ``onnx/`` (encoder tasks), as ``lightning-peft export --onnx true``.

    With a ``WandbLogger`` whose ``log_model`` is set, each export is also logged as a W&B artifact of type
    ``model`` (aliases ``latest`` and ``best``).

    Example::

        trainer = Trainer(callbacks=[ModelCheckpoint(monitor="val/f1", mode="max"), AdapterExport(merge=True)])
    """

    def __init__(self, dirpath: str | None = None, merge: bool = False, on_best: bool = False,
                 overwrite: bool = False, push_to_hub: str | None = None, private: bool | None = None,
                 quantize: str | None = None, onnx: bool = False) -> None:
        self.push_to_hub = push_to_hub
        self.quantize = quantize
        self.onnx = onnx
        self.private = private
        self.dirpath = dirpath
        self.merge = merge
        self.on_best = on_best
        self.overwrite = overwrite
        self._best: tuple[Any, ...] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not isinstance(pl_module, ExportableTask):
            raise LightningPeftError(
                f"AdapterExport: the model must be a lightning_peft PeftModule, got {type(pl_module).__name__}"
            )
        if stage == "fit":  # refuse a foreign directory or an impossible compression now, not after the whole fit
            check_replaceable(self.directory(trainer).absolute(), FIELD, self.overwrite)
            if self.quantize is not None or self.onnx:
                check_compressible(pl_module, self.quantize, self.onnx, prefix="AdapterExport.")

    def directory(self, trainer: Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.default_root_dir) / EXPORT_DIR)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """A new best checkpoint is being written (Lightning updates ``best_model_*`` first, and calls this hook
        before the module's, so the metrics come from the trainer): export these weights."""
        if not self.on_best or trainer.sanity_checking:
            return
        best = self._best_of(trainer)
        if best is None or best == self._best:
            return  # no best yet, or a ``last.ckpt`` written after the best one
        self._best = best
        if trainer.is_global_zero:
            metrics = validation_metrics(trainer.callback_metrics)
            directory = pl_module.export(
                self.directory(trainer), tokenizer=_tokenizer(trainer), merge=self.merge, metrics=metrics,
                data=_data_facts(trainer), training={"checkpoint": Path(best[0]).name, "epoch": trainer.current_epoch,
                                                     "optimizer steps": trainer.global_step},
                overwrite=self.overwrite, field=FIELD,
            )
            rank_zero_info(f"new best checkpoint: exported to {directory}")
            _log_artifact(trainer, directory, metrics)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        best_path = getattr(trainer.checkpoint_callback, "best_model_path", "")
        tokenizer, data = _tokenizer(trainer), _data_facts(trainer)
        if best_path and Path(best_path).is_file():
            directory = export_checkpoint(pl_module, best_path, self.directory(trainer), tokenizer, self.merge, data,
                                          overwrite=self.overwrite, field=FIELD, quantize=self.quantize,
                                          onnx=self.onnx)
            rank_zero_info(f"best checkpoint {best_path} exported to {directory}")
            self._published(trainer, directory, {})
            return
        metrics = validation_metrics(trainer.callback_metrics)
        training = {"checkpoint": "none (final weights)", "epoch": trainer.current_epoch,
                    "optimizer steps": trainer.global_step}
        directory = pl_module.export(self.directory(trainer), tokenizer=tokenizer, merge=self.merge, metrics=metrics,
                                     data=data, training=training, overwrite=self.overwrite, field=FIELD,
                                     quantize=self.quantize, onnx=self.onnx)
        rank_zero_info(f"no best checkpoint to export: final weights exported to {directory}")
        self._published(trainer, directory, metrics)

    def _published(self, trainer: Trainer, directory: Path, metrics: dict[str, float]) -> None:
        """After the fit-end export: a W&B artifact (see :func:`_log_artifact`) and the Hub upload, when asked."""
        _log_artifact(trainer, directory, metrics)
        if self.push_to_hub:
            url = push_export(directory, self.push_to_hub, self.private, field="AdapterExport.push_to_hub")
            rank_zero_info(f"export pushed to the Hub: {url}")

    @staticmethod
    def _best_of(trainer: Trainer) -> tuple[Any, ...] | None:
        checkpoint = trainer.checkpoint_callback
        path = getattr(checkpoint, "best_model_path", "")
        if not path:
            return None
        score = getattr(checkpoint, "best_model_score", None)
        # the same file name (``best.ckpt``) is reused, so the score tells a new best; without a monitor, the step
        return (path, float(score)) if score is not None else (path, trainer.global_step)


def _log_artifact(trainer: Trainer, directory: Path, metrics: dict[str, float]) -> None:
    """Log the export as a W&B model artifact when a ``WandbLogger`` has ``log_model`` set."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_log_model", False):
            import wandb

            artifact = wandb.Artifact(f"export-{logger.experiment.id}", type="model", metadata=metrics)
            artifact.add_dir(str(directory))
            logger.experiment.log_artifact(artifact, aliases=["latest", "best"])


def _tokenizer(trainer: Trainer) -> Any | None:
    datamodule = getattr(trainer, "datamodule", None)
    return datamodule.tokenizer if isinstance(datamodule, TokenizedData) else None


def _data_facts(trainer: Trainer) -> dict[str, Any]:
    datamodule = getattr(trainer, "datamodule", None)
    return datamodule.card_facts() if isinstance(datamodule, TokenizedData) else {}
