"""``JsonlPredictionWriter``: one JSON line per predicted example, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from lightning_peft.errors import LightningPeftError


def is_jsonl(path: Path) -> bool:
    """Whether every non-empty line of ``path`` is a JSON object: what an earlier prediction run wrote."""
    try:
        with open(path, encoding="utf-8") as f:
            return all(isinstance(json.loads(line), dict) for line in f if line.strip())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes each record that the task's ``predict_step`` returns as a JSON line.

    Records go to ``<output_path>.tmp`` while predicting and are renamed to ``output_path`` when prediction
    ends, so an interrupted run never leaves a truncated file under the final name. An existing file is replaced
    only when it is JSON lines (earlier predictions), unless ``overwrite``. Under DDP each rank
    writes ``<stem>.rank<N><suffix>``. When the datamodule served the predict split sorted by length (its
    ``predict_order``), records are held until the end and written in the input file's order.

    Example::

        trainer = Trainer(callbacks=[JsonlPredictionWriter("predictions.jsonl")])
        trainer.predict(model, datamodule=dm, return_predictions=False)
    """

    def __init__(self, output_path: str = "predictions.jsonl", overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_path = Path(output_path)
        self.overwrite = overwrite
        self._file: Any = None
        self._path: Path | None = None
        self._order: list[int] | None = None
        self._held: list[tuple[int, dict[str, Any]]] = []

    def _rank_path(self, trainer: Trainer) -> Path:
        if trainer.world_size == 1:
            return self.output_path
        p = self.output_path
        return p.with_name(f"{p.stem}.rank{trainer.global_rank}{p.suffix}")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._path = self._rank_path(trainer)
        if self._path.is_dir() or (self._path.exists() and not self.overwrite and not is_jsonl(self._path)):
            raise LightningPeftError(
                f"predictions_path: {str(self._path)!r} exists and is not an earlier predictions file; choose "
                "another path (or pass --overwrite true to replace it)"
            )
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(f"{self._path}.tmp", "w", encoding="utf-8")  # noqa: SIM115 - closed in on_predict_end
        self._order = getattr(trainer.datamodule, "predict_order", None)
        self._held = []

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: list[dict[str, Any]],
        batch_indices: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if self._order is None:
            self._write(prediction)
        else:  # one record per example: batch_indices are their rows in the sorted split
            self._held.extend((self._order[i], record) for i, record in zip(batch_indices, prediction, strict=True))

    def _write(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
            Path(f"{self._path}.tmp").unlink(missing_ok=True)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write([record for _, record in sorted(self._held, key=lambda item: item[0])])
        self._held = []
        self._file.close()
        os.replace(f"{self._path}.tmp", self._path)
        print(f"predictions written to {self._path}")
