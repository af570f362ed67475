"""``AdaLoRAScheduler``: drives peft's AdaLoRA rank allocation on optimizer steps, adds its orthogonal
regulariser to every task's loss, and reports the final per-layer ranks."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from peft.tuners.adalora import AdaLoraModel

from lightning_peft.errors import LightningPeftError
from lightning_peft.figures import plotting, save_figure

HEATMAP_FILE = "adalora_ranks.png"
CHECKPOINT_KEY = "adalora"
ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")
#: the task's loss term that carries AdaLoRA's orthogonal regulariser during a fit
ORTH_REG_TERM = "adalora_orth_reg"


@dataclass
class AdaLoraConfig(peft.AdaLoraConfig):
    """peft's ``AdaLoraConfig`` whose schedule :class:`AdaLoRAScheduler` completes from the fit.

    ``total_step`` may be left out (the fit's optimizer steps are used), and ``tinit`` / ``tfinal`` may be given as
    fractions of them (below 1), so one config serves any dataset size, epoch count or sweep. The exported adapter
    config holds the resolved integers and is plain peft's.

    Example::

        AdaLoraConfig(init_r=12, target_r=8, tinit=0.1, tfinal=0.3, deltaT=10)  # 10% warm-up, last 30% fixed ranks
    """

    tinit: float = field(default=0, metadata={"help": "Initial warm-up: optimizer steps, or a fraction of them."})
    tfinal: float = field(default=0, metadata={"help": "Final phase: optimizer steps, or a fraction of them."})

    def __post_init__(self) -> None:
        self.requested_schedule = (self.tinit, self.tfinal)
        total_step = self.total_step
        self.tinit, self.tfinal, self.total_step = 0, 0, 1  # peft insists on a schedule now; ours is checked at fit
        super().__post_init__()
        self.tinit, self.tfinal = self.requested_schedule
        self.total_step = total_step

    def resolve_schedule(self, fit_steps: int) -> None:
        """Set ``total_step`` to the fit's optimizer steps and fractional ``tinit`` / ``tfinal`` to steps of it."""
        self.total_step = fit_steps
        self.tinit, self.tfinal = (math.floor(v * fit_steps) if 0 < v < 1 else int(v) for v in self.requested_schedule)


def adalora_model(pl_module: LightningModule) -> AdaLoraModel:
    """The peft ``AdaLoraModel`` inside a task, or a clear error when the task's PEFT method is not AdaLoRA."""
    tuner = getattr(getattr(pl_module, "model", None), "base_model", None)
    if not isinstance(tuner, AdaLoraModel):
        raise LightningPeftError(
            "AdaLoRAScheduler: the model's PEFT method is not AdaLoRA; set model.peft to peft.AdaLoraConfig "
            "or remove the callback"
        )
    return tuner


def orthogonal_regulariser(tuner: AdaLoraModel) -> torch.Tensor:
    """Mean over AdaLoRA's ``lora_A`` / ``lora_B`` of ``‖PᵀP − I‖_F`` (``‖QQᵀ − I‖_F``): the penalty peft adds
    inside ``AdaLoraModel.forward`` only when the HF model computes the loss itself."""
    adapter = tuner.trainable_adapter_name
    terms = []
    for name, param in tuner.model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and adapter in name:
            cov = param @ param.T if "lora_A" in name else param.T @ param
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)))
    return torch.stack(terms).mean() if terms else torch.zeros(())


def rank_table(rank_pattern: dict[str, list[bool]]) -> tuple[list[str], list[int], list[list[int | None]]]:
    """Final ranks as (module names with the layer index as ``*``, layer indices, ranks[module][layer])."""
    ranks: dict[tuple[str, int], int] = {}
    for key, mask in rank_pattern.items():
        match = re.search(r"\.(\d+)\.", key)
        layer = int(match.group(1)) if match else 0
        module = re.sub(r"\.(\d+)\.", ".*.", key, count=1).split(".lora_", 1)[0].split(".%s", 1)[0]
        module = module.removeprefix("base_model.").removeprefix("model.")
        ranks[(module, layer)] = int(sum(mask))
    modules = sorted({m for m, _ in ranks})
    layers = sorted({layer for _, layer in ranks})
    return modules, layers, [[ranks.get((m, layer)) for layer in layers] for m in modules]


class AdaLoRAScheduler(Callback):
    """Runs AdaLoRA's budget schedule with Lightning: ``update_and_allocate`` once per optimizer step.

    peft's order is backward → ``optimizer.step()`` → ``update_and_allocate(step)`` → ``zero_grad()``. Lightning
    zeroes gradients inside the *next* step's closure, so ``on_train_batch_end`` sees the stepped weights with
    their gradients still in place; under gradient accumulation it acts only on batches that stepped
    (``trainer.global_step`` advanced), and passes the 0-based optimizer step, as in peft's loop. With AMP the
    gradients are already unscaled there. ``total_step`` is set from ``trainer.estimated_stepping_batches``.

    The orthogonal regulariser (``orth_reg_weight``) is added to the training loss of every task through
    ``PeftModule.loss_terms`` (peft adds it only to a loss the HF model computes itself, which our tasks do not);
    peft's own addition is switched off during fit so that a subclass using the model's loss is not counted twice.
    Logged each step: ``adalora/budget`` and ``adalora/target_budget``. At fit end the final ranks per module and
    layer are printed as a table and saved as a heatmap PNG (``heatmap: true``; needs matplotlib) next to the
    checkpoints and sent to the logger when it takes images (W&B, TensorBoard). The final ``rank_pattern`` stays in
    the adapter config, so exports reload with plain peft. Checkpoints carry the rank pattern and the sensitivity
    averages, so a resumed fit continues the schedule.

    Example::

        trainer = Trainer(callbacks=[AdaLoRAScheduler()])  # model.peft: AdaLoraConfig(target_r=4, init_r=8, …)
    """

    allocates_adalora_ranks = True  # what a task fitting AdaLoRA looks for among the trainer's callbacks

    def __init__(self, heatmap: bool = True) -> None:
        self.heatmap = heatmap
        self.last_step = -1
        self._orth_reg_weight: float | None = None  # peft's weight while the task's loss term applies it

    # -- fit lifecycle -----------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the config against this fit and complete its schedule, then move the orthogonal regulariser's weight
        from peft's config into the task's loss terms. Done here, before any ``on_fit_start``, so that a
        learning-rate range test (``training.lr: auto``, run at fit start with Lightning's finder as the only
        callback) trains the objective the fit trains, and a config that cannot train fails before it."""
        if stage != "fit":
            return
        tuner = adalora_model(pl_module)
        if isinstance(trainer.strategy, FSDPStrategy):
            raise LightningPeftError(
                "AdaLoRAScheduler: AdaLoRA cannot run under FSDP: its sensitivity scores (weight x gradient) would "
                "come from each process's shard and allocate different ranks per process; use DDP (configs/trainer/"
                "ddp.yaml), which keeps whole gradients on every process"
            )
        if sum(isinstance(callback, AdaLoRAScheduler) for callback in trainer.callbacks) > 1:
            raise LightningPeftError(
                "trainer.callbacks: AdaLoRAScheduler is listed more than once (configs/peft/adalora.yaml appends one "
                "to the callbacks of the configs before it); each would step the rank allocation, so keep one"
            )
        config = tuner.peft_config[tuner.trainable_adapter_name]
        total = int(trainer.estimated_stepping_batches)
        if isinstance(config, AdaLoraConfig):
            config.resolve_schedule(total)
        if config.init_r <= config.target_r:
            raise LightningPeftError(
                f"model.peft: AdaLoRA prunes ranks from init_r down to target_r, but init_r={config.init_r} <= "
                f"target_r={config.target_r} leaves nothing to prune (peft's allocator fails on it); raise init_r "
                "above target_r, or use LoRA (peft.LoraConfig) for one fixed rank"
            )
        if config.tinit + config.tfinal >= total:
            raise LightningPeftError(
                f"model.peft: AdaLoRA needs tinit + tfinal < total optimizer steps, but tinit={config.tinit} + "
                f"tfinal={config.tfinal} >= {total} steps of this fit; lower them or train longer"
            )
        if config.total_step != total:  # peft requires some total_step > 0 in the config; this fit decides it
            rank_zero_info(f"AdaLoRA total_step: {total} optimizer steps (the config said {config.total_step})")
        tuner.rankallocator.set_total_step(total)
        weight = self._orth_reg_weight = config.orth_reg_weight
        config.orth_reg_weight = 0.0  # peft would add it to a loss computed from labels; the task adds it instead
        if weight > 0:
            pl_module.loss_terms[ORTH_REG_TERM] = lambda *_: weight * orthogonal_regulariser(tuner)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.last_step = trainer.global_step  # after a resume restored it

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.last_step:
            return  # accumulating gradients: no optimizer step on this batch
        self.last_step = trainer.global_step
        tuner = adalora_model(pl_module)
        step = trainer.global_step - 1  # the optimizer step just taken, counted from 0
        tuner.update_and_allocate(step)
        budget, _ = tuner.rankallocator.budget_schedule(step)
        pl_module.log("adalora/budget", float(budget))
        pl_module.log("adalora/target_budget", float(tuner.rankallocator.target_bgt))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        config = self._detach_regulariser(pl_module)
        if config.rank_pattern:
            self.report(trainer, config.rank_pattern)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._detach_regulariser(pl_module)

    def _detach_regulariser(self, pl_module: LightningModule) -> AdaLoraConfig:
        """Undo :meth:`setup`: the regulariser's weight back in peft's config, the loss term gone; the config."""
        tuner = adalora_model(pl_module)
        config = tuner.peft_config[tuner.trainable_adapter_name]
        if self._orth_reg_weight is not None:
            config.orth_reg_weight, self._orth_reg_weight = self._orth_reg_weight, None
        pl_module.loss_terms.pop(ORTH_REG_TERM, None)
        return config

    # -- report ------------------------------------------------------------------------------------------
    @rank_zero_only
    def report(self, trainer: Trainer, rank_pattern: dict[str, list[bool]]) -> None:
        modules, layers, ranks = rank_table(rank_pattern)
        width = max(len(m) for m in modules)
        lines = [f"{'module':<{width}} " + " ".join(f"{f'L{layer}':>4}" for layer in layers)]
        for module, row in zip(modules, ranks, strict=True):
            lines.append(f"{module:<{width}} " + " ".join(f"{'-' if r is None else r:>4}" for r in row))
        rank_zero_info("AdaLoRA final ranks per module and layer:\n" + "\n".join(lines))
        if self.heatmap:
            directory = Path(getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir)
            self._heatmap(trainer, directory / HEATMAP_FILE, modules, layers, ranks)

    def _heatmap(self, trainer: Trainer, path: Path, modules: list[str], layers: list[int], ranks: list) -> None:
        plt = plotting("AdaLoRAScheduler")
        if plt is None:
            return
        values = torch.tensor([[float("nan") if r is None else r for r in row] for row in ranks])
        figure, axes = plt.subplots(figsize=(1.2 + 0.5 * len(layers), 1.0 + 0.35 * len(modules)))
        image = axes.imshow(values.numpy(), cmap="viridis", aspect="auto")
        axes.set_xticks(range(len(layers)), [str(layer) for layer in layers])
        axes.set_yticks(range(len(modules)), modules, fontsize=7)
        axes.set_xlabel("layer")
        axes.set_title("AdaLoRA final rank")
        figure.colorbar(image, ax=axes)
        save_figure(trainer, figure, path, "adalora/ranks")
        rank_zero_info(f"AdaLoRA rank heatmap saved to {path}")

    # -- checkpoints: a resumed fit continues the schedule with the same sensitivity averages (the ranks are saved
    # by the task, as exports from a checkpoint need them too) -----------------------------------------------
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        allocator = adalora_model(pl_module).rankallocator
        checkpoint[CHECKPOINT_KEY] = {name: dict(getattr(allocator, name)) for name in ALLOCATOR_STATE}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            return
        allocator = adalora_model(pl_module).rankallocator
        for name in ALLOCATOR_STATE:
            setattr(allocator, name, dict(state[name]))
