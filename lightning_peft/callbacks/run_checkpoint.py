"""``RunCheckpoint``: Lightning's ``ModelCheckpoint`` that leaves a resumable ``last.ckpt`` when a fit is stopped."""

from __future__ import annotations

import os
import random
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

RNG_KEY = "rng_states"


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is always the run's latest state, also when the run is stopped: Ctrl-C
    or SIGTERM during ``fit`` ends the run at the next batch boundary and writes ``last.ckpt``, which
    ``fit --ckpt_path last`` resumes exactly.

    Lightning 2.6 refreshes ``last.ckpt`` only when a top-k checkpoint is saved at the same step, so with a monitor
    it stays at the last *improving* epoch; a resume from it would repeat epochs and a sweep reading it would report
    an old metric. Here ``last.ckpt`` is written at every epoch's checkpoint point.

    Stopping goes through Lightning's own signal handling: SIGTERM makes the loops raise ``SIGTERMException`` once
    the running batch is done, and a first Ctrl-C is turned into the same SIGTERM (a second one stops at once,
    without a checkpoint). The checkpoint then holds the loops' progress, the training data's position in the epoch
    (``TextDataModule.state_dict``) and the random number generators' states, which
    are restored before the next training batch, so dropout continues where it stopped.

    Takes every ``ModelCheckpoint`` argument; the CLI's ``checkpoint`` group is this class.

    Example::

        trainer = Trainer(callbacks=[RunCheckpoint(dirpath="runs/x/checkpoints", monitor="val/loss", save_last=True)])
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rng_states_to_restore: dict[str, Any] | None = None
        self._previous_sigint: Any = None

    # -- last.ckpt is the latest state -----------------------------------------------------------------
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def _refresh_last(self, trainer: Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer) and (
            self._last_global_step_saved != trainer.global_step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # -- stopping ---------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if _in_main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._sigint_as_sigterm)

    def _sigint_as_sigterm(self, signum: int, frame: FrameType | None) -> None:
        rank_zero_info("\nCtrl-C: stopping after this batch and writing last.ckpt (press Ctrl-C again to abort)")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.kill(os.getpid(), signal.SIGTERM)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and _in_main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_sigint()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        super().on_exception(trainer, pl_module, exception)
        if not isinstance(exception, SIGTERMException) or not self.dirpath or trainer.sanity_checking:
            return
        if trainer.state.fn != "fit" or trainer.fast_dev_run:
            return
        path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        rank_zero_info(f"fit stopped at step {trainer.global_step}: resume it with --ckpt_path last ({path})")

    # -- random number generators -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state[RNG_KEY] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state[RNG_KEY]["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_states_to_restore = state_dict.get(RNG_KEY)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != RNG_KEY})

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Restore the generators right before the first resumed batch: creating the data iterator on resume draws
        from them, which the uninterrupted run did at the epoch's start."""
        states, self._rng_states_to_restore = self._rng_states_to_restore, None
        if not states:
            return
        torch.set_rng_state(states["torch"])
        python = states["python"]
        random.setstate((python[0], tuple(python[1]), python[2]))
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])


def _in_main_thread() -> bool:
    """Signal handlers can only be installed from the main thread (not, e.g., from a notebook's worker thread)."""
    return threading.current_thread() is threading.main_thread()
