"""``training.lr: auto``: a learning-rate range test on the real setup before fit, with the rate picked by one
documented rule (:func:`choose_learning_rate`), logged, drawn and kept in the checkpoint and the model card."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateFinder
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_peft.errors import LightningPeftError
from lightning_peft.figures import plotting, save_figure

PLOT_FILE = "lr_find.png"
CURVE_FILE = "lr_find.json"
#: the rule, as logs and model cards state it
RULE = "a third of the rate at which the smoothed loss is lowest"
#: the loss must fall by this fraction of its starting value for the test to count
MIN_RELATIVE_FALL = 0.10
SMOOTHING_WINDOW = 9  # steps in the running median that takes out single-batch noise
DIVISOR = 3.0  # the loss's minimum lies at 1-5x (mostly 2-3x) the best whole-fit rate (benchmarks/README.md)
TURN = 0.5  # the test stops once the smoothed loss has climbed back this fraction of its fall
#: the fewest steps a rate can be read from: two complete running-median windows, plus the half window at the end
MIN_STEPS = 2 * SMOOTHING_WINDOW + SMOOTHING_WINDOW // 2


def smoothed(losses: Sequence[float], window: int = SMOOTHING_WINDOW) -> list[float]:
    """The running median of ``losses`` over ``window`` steps centred on each (shorter at the ends)."""
    half = window // 2
    return [float(torch.tensor(losses[max(0, i - half):i + half + 1]).median()) for i in range(len(losses))]


def _minimum(losses: Sequence[float]) -> tuple[list[float], int] | None:
    """The running median of the finite ``losses`` (up to the last step whose window is complete, so a test stopped
    early reads as a full one does) and the index of its minimum; ``None`` when it never fell by
    :data:`MIN_RELATIVE_FALL`."""
    finite = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), len(losses))
    if finite < MIN_STEPS:
        return None
    curve = smoothed(losses[:finite])[:finite - SMOOTHING_WINDOW // 2]
    lowest = min(range(len(curve)), key=curve.__getitem__)
    if lowest == 0 or curve[lowest] > curve[0] * (1 - MIN_RELATIVE_FALL):
        return None
    return curve, lowest


def choose_learning_rate(lrs: Sequence[float], losses: Sequence[float]) -> float | None:
    """The rate a range test (``losses[i]``: the task's training loss with the learning rate rising to ``lrs[i]``)
    points to, by :data:`RULE`: take out single-batch noise with a running median, stop at the first non-finite
    loss, find the smoothed loss's minimum and return a third of its rate. ``None`` when the loss never fell by
    :data:`MIN_RELATIVE_FALL` (too few steps, or a method that needs longer to move): no rate can be read from such
    a curve.

    The minimum, not the steepest fall: a classifier head that first learns the label prior (token classification,
    where most tags are ``O``) makes the steepest fall come early, at a rate far below the one that trains the
    adapter; the minimum lies past every such early fall.

    Example::

        rates = [10 ** (i / 20 - 5) for i in range(100)]  # 1e-5 … 1
        choose_learning_rate(rates, [0.69] * 100)  # a flat curve: None
    """
    found = _minimum(losses)
    return None if found is None else lrs[found[1]] / DIVISOR


def still_falling(losses: Sequence[float]) -> bool:
    """Whether a range test's smoothed loss fell and is lowest at its last step: its minimum lies past the range."""
    found = _minimum(losses)
    return found is not None and found[1] == len(found[0]) - 1


def has_turned(losses: Sequence[float]) -> bool:
    """Whether a range test has shown its minimum, so that further steps would only cost time: the smoothed loss
    fell by :data:`MIN_RELATIVE_FALL` and has climbed back :data:`TURN` of that fall since, or a loss is no longer
    finite.

    Example::

        has_turned([0.69] * 30 + [0.5] * 30)  # still at its lowest: False
    """
    if not all(math.isfinite(loss) for loss in losses):
        return True
    found = _minimum(losses)
    if found is None:
        return False
    curve, lowest = found
    return curve[-1] > curve[lowest] + TURN * (curve[0] - curve[lowest])


@dataclass
class RangeTestRecord:
    """One range test's optimizer steps: the rate each applied and the mean task loss of its batches."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


@contextmanager
def recorded_steps(module: pl.LightningModule, trainer: pl.Trainer,
                   stop_when: Callable[[list[float]], bool] | None = None) -> Iterator[RangeTestRecord]:
    """Record each optimizer step that ``module`` takes while the block runs: the rate it applied and the mean loss
    of the batches it summed (one, or a window of accumulated batches; an epoch may end on a shorter window).
    Lightning's finder keeps only a heavily smoothed loss, which hides where a short test turns, and skips the steps
    that end an epoch on a short window. With ``stop_when``, the trainer stops once ``stop_when(losses)`` holds on
    process 0, every process with it (the decision is broadcast after each step).

    The loss recorded is the task's own (a lightning-peft task's first ``batch_loss`` of the step), without the
    terms added to it for training (an AdaLoRA orthogonality penalty, L2 on the adapter): those are trained, but a
    penalty falls at any rate and would hide where the task's loss turns. Other modules: ``training_step``'s loss.
    """
    record = RangeTestRecord()
    batch_losses: list[float] = []
    task_losses: list[torch.Tensor] = []
    training_step, optimizer_step = module.training_step, module.optimizer_step
    batch_loss = getattr(module, "batch_loss", None)

    def recording_batch_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
        loss = batch_loss(*args, **kwargs)
        task_losses.append(loss)
        return loss

    def recording_training_step(*args: Any, **kwargs: Any) -> Any:
        task_losses.clear()
        output = training_step(*args, **kwargs)
        step_loss = output["loss"] if isinstance(output, Mapping) else output
        loss = task_losses[0] if task_losses else step_loss
        batch_losses.append(float(loss.detach()) if loss is not None else math.nan)
        return output

    def recording_optimizer_step(*args: Any, **kwargs: Any) -> Any:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        output = optimizer_step(*args, **kwargs)  # runs the step's last batch (Lightning's closure)
        record.lrs.append(lr)
        record.losses.append(sum(batch_losses) / len(batch_losses) if batch_losses else math.nan)
        batch_losses.clear()
        if stop_when is not None and trainer.strategy.broadcast(stop_when(record.losses)):
            trainer.should_stop = True
        return output

    module.training_step = recording_training_step  # type: ignore[method-assign]
    module.optimizer_step = recording_optimizer_step  # type: ignore[method-assign]
    if batch_loss is not None:
        module.batch_loss = recording_batch_loss  # type: ignore[method-assign]
    try:
        yield record
    finally:
        del module.training_step, module.optimizer_step  # the class's methods again
        if batch_loss is not None:
            del module.batch_loss


@contextmanager
def only_training(trainer: pl.Trainer) -> Iterator[None]:
    """Let a range test run its steps over as many epochs as it needs, whatever the fit's ``max_epochs`` (a small
    data set would otherwise end it after a few steps), end when it is told to, whatever the fit's ``min_epochs`` and
    ``min_steps`` (Lightning ignores a stop before them), and skip the validation passes that Lightning's finder leaves
    on at each epoch's end and when the test is stopped (they would only add to its cost)."""
    fit_loop, epoch_loop = trainer.fit_loop, trainer.fit_loop.epoch_loop
    limits = fit_loop.max_epochs, fit_loop.min_epochs, epoch_loop.min_steps, trainer.check_val_every_n_epoch
    fit_loop.max_epochs, fit_loop.min_epochs, epoch_loop.min_steps = -1, 0, None  # -1: no limit
    trainer.check_val_every_n_epoch = sys.maxsize  # no epoch of the test is one to validate
    try:
        yield
    finally:
        fit_loop.max_epochs, fit_loop.min_epochs, epoch_loop.min_steps, trainer.check_val_every_n_epoch = limits


class LearningRateSearch(LearningRateFinder):
    """Pick the peak learning rate of a fit by a range test on its real setup (task, PEFT method, data, batch size,
    precision, strategy): Lightning's ``LearningRateFinder`` trains up to ``num_training_steps`` steps with the rate
    rising exponentially from ``min_lr`` to ``max_lr`` (with ``stop_once_turned``, only until the loss has passed its
    minimum: :func:`has_turned`) and then restores the model; :func:`choose_learning_rate` reads the rate off the
    losses. The task then trains with it (optimizer and schedule built anew), logs it, keeps it in
    its checkpoints (a resumed fit reuses it, no second test) and in the model card; ``lr_find.png`` (loss against
    rate, the pick marked) and ``lr_find.json`` are written beside the checkpoints and the plot goes to every logger
    that takes images. Under DDP the losses of process 0 decide and every process trains with the same rate. When the
    curve shows no fall, the method's default rate is kept, with a warning.

    Tasks add it themselves for ``training.lr: auto``; list it under ``trainer.callbacks`` to change its settings.

    Example::

        model:
          init_args:
            training: {lr: auto}
        trainer:
          callbacks:  # optional
            - class_path: lightning_peft.callbacks.LearningRateSearch
              init_args: {num_training_steps: 200}
    """

    def __init__(self, min_lr: float = 1e-5, max_lr: float = 1.0, num_training_steps: int = 100,
                 early_stop_threshold: float | None = 4.0, stop_once_turned: bool = True) -> None:
        if num_training_steps < MIN_STEPS:
            raise LightningPeftError(
                f"LearningRateSearch.num_training_steps: a rate is read from {MIN_STEPS} steps or more (a "
                f"{SMOOTHING_WINDOW}-step running median over at least two windows), got {num_training_steps}; the "
                "default, 100, covers 1e-5 to 1 at 20 steps a decade"
            )
        if not 0 < min_lr < max_lr:
            raise LightningPeftError(
                f"LearningRateSearch.min_lr, max_lr: the rate rises from min_lr to max_lr, so 0 < min_lr < max_lr; "
                f"got {min_lr:g} and {max_lr:g}"
            )
        super().__init__(min_lr=min_lr, max_lr=max_lr, num_training_steps=num_training_steps, mode="exponential",
                         early_stop_threshold=early_stop_threshold, update_attr=False)
        self.stop_once_turned = stop_once_turned
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.chosen_lr: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not getattr(pl_module, "searches_learning_rate", False):
            rank_zero_warn("LearningRateSearch: no search, since model.init_args.training.lr is not auto")
            return
        if trainer.ckpt_path is not None:
            rank_zero_info("learning-rate search skipped: a resumed fit keeps the rate its checkpoint was trained with")
            return
        self._warn_if_costly(trainer)
        stop_when = has_turned if self.stop_once_turned else None
        with recorded_steps(pl_module, trainer, stop_when) as record, only_training(trainer):
            self.lr_find(trainer, pl_module)
        if self.optimal_lr is None:  # Lightning skips it under fast_dev_run, saying so
            return
        # process 0's curve decides, as Lightning's finder does
        lrs, losses = trainer.strategy.broadcast((record.lrs, record.losses))
        self.lrs, self.losses = lrs, losses
        self.chosen_lr = choose_learning_rate(lrs, losses)
        if len(losses) < self._num_training_steps and has_turned(losses):
            rank_zero_info(f"learning-rate range test: ended after {len(losses)} steps, once the loss had turned "
                           "(Lightning's finder reports any early end as 'due to diverging loss')")
        if trainer.is_global_zero:
            self._write_curve(trainer, lrs)
        if self.chosen_lr is None:
            rank_zero_warn(
                f"training.lr: auto: the loss did not fall by {MIN_RELATIVE_FALL:.0%} over the {len(lrs)}-step range "
                f"test ({lrs[0]:g} to {lrs[-1]:g}; {CURVE_FILE} has the curve), so no rate can be read "
                "from it; training with the method's default. Give the test more steps (LearningRateSearch "
                "num_training_steps) or set training.lr"
            )
            return
        if still_falling(losses):
            rank_zero_warn(
                f"training.lr: auto: the loss was still falling at the end of the range test ({lrs[-1]:g}; "
                f"{CURVE_FILE} has the curve), so its minimum lies beyond it and {self.chosen_lr:g}, a third of the "
                "highest rate read, may be low; raise LearningRateSearch max_lr"
            )
        pl_module.found_learning_rate = self.chosen_lr
        trainer.strategy.setup_optimizers(trainer)  # the schedule's peak is the rate found
        for logger in trainer.loggers:
            logger.log_metrics({"lr_search/lr": self.chosen_lr}, step=trainer.global_step)

    def _warn_if_costly(self, trainer: pl.Trainer) -> None:
        steps = trainer.estimated_stepping_batches
        if math.isfinite(steps) and self._num_training_steps > 0.15 * steps:
            rank_zero_warn(
                f"training.lr: auto: the range test's {self._num_training_steps} steps (fewer once the loss turns) "
                f"cost up to {100 * self._num_training_steps / steps:.0f}% of this fit's {int(steps)} optimizer "
                "steps; for a fit this short, a fixed training.lr (the method's default is a measured one) is cheaper"
            )

    def output_dir(self, trainer: pl.Trainer) -> Path:
        """Where the curve goes: the checkpoint directory, else the log directory, else ``default_root_dir``."""
        checkpoint = trainer.checkpoint_callback
        directory = getattr(checkpoint, "dirpath", None) or trainer.log_dir or trainer.default_root_dir
        return Path(directory)

    def _write_curve(self, trainer: pl.Trainer, lrs: Sequence[float]) -> None:
        directory = self.output_dir(trainer)
        directory.mkdir(parents=True, exist_ok=True)
        curve = {"rule": RULE, "lr": self.chosen_lr, "lrs": list(lrs), "losses": self.losses,
                 "smoothed_losses": smoothed(self.losses)}
        (directory / CURVE_FILE).write_text(json.dumps(curve, indent=1) + "\n")
        figures = plotting("learning-rate search")
        if figures is not None:
            figure, axes = figures.subplots(figsize=(5, 3.5))
            axes.plot(lrs, self.losses, color="0.75", linewidth=0.8, label="loss per step")
            axes.plot(lrs, curve["smoothed_losses"], label=f"running median ({SMOOTHING_WINDOW} steps)")
            if self.chosen_lr is not None:
                axes.axvline(self.chosen_lr, color="red", linestyle="--", label=f"chosen: {self.chosen_lr:.2g}")
            axes.set(xscale="log", xlabel="learning rate", ylabel="task loss (training)", title=RULE)
            axes.title.set_fontsize(8)
            axes.legend(fontsize=7)
            save_figure(trainer, figure, directory / PLOT_FILE, key="lr_search/curve")
        rank_zero_info(f"learning-rate range test: {directory / (PLOT_FILE if figures is not None else CURVE_FILE)}")
