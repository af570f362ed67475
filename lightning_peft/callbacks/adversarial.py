"""``AdversarialTraining``: FGM / PGD perturbations of the input embeddings, their loss added to the clean loss."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_peft.errors import LightningPeftError
from lightning_peft.types import Batch, LossTermTask

ADVERSARIAL_TERM = "adversarial"


def per_example_unit(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` scaled so that each example (first dimension) has L2 norm 1 (zero rows stay zero)."""
    norms = tensor.flatten(1).norm(dim=1).clamp_min(1e-12)
    return tensor / norms.view(-1, *[1] * (tensor.dim() - 1))


def project(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``delta`` with each example's perturbation pulled back into the L2 ball of radius ``epsilon``."""
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (epsilon / norms).clamp(max=1.0)
    return delta * scale.view(-1, *[1] * (delta.dim() - 1))


class AdversarialTraining(Callback):
    """Adds an adversarial loss to every training step (FGM, Miyato et al. 2017; PGD, Madry et al. 2018).

    The perturbation is added to the *output* of the input-embedding layer (and of the layers tied to it, such as
    T5's encoder and decoder ``embed_tokens``) through a forward hook, so the
    embedding weights are never touched (they may be frozen by PEFT, and nothing needs restoring); outside the
    training step the hook passes outputs through unchanged. Per training step:

    - the clean loss is computed as usual, recording the embedding outputs;
    - **FGM**: ``δ = ε · g / ‖g‖`` with ``g`` the gradient of the clean loss with respect to the embedding output,
      normalised per example; **PGD**: ``steps`` ascent steps ``δ ← Π_ε(δ + α · g/‖g‖)`` from ``δ = 0``, each on the
      perturbed loss, projected on the per-example L2 ball of radius ``ε``;
    - the task loss on the perturbed embeddings, times ``weight``, is added to the clean loss (logged as
      ``train/adversarial``), and the optimizer steps on the sum.

    Works with every task and PEFT method (including prompt tuning: virtual tokens are not perturbed) and with
    R-Drop and length-grouped micro-batches (each micro-batch gets its own perturbation). The perturbation is
    bounded per example, so while it runs the task trains on micro-batches rather than on packed rows (which
    hold several examples each): it declares ``supports_sequence_packing = False``, which the task reads when it
    chooses its batching at the first batch.

    Args:
        method: ``fgm`` (a step costs about 3x a plain one: a gradient to the embeddings, then a perturbed forward
            and backward) or ``pgd`` (``steps`` more perturbed forward/backward passes).
        epsilon: radius of the perturbation, L2 norm per example over (positions × hidden size). The gradient puts
            most of it on a few tokens, so it should stay well below one token embedding's norm (about 1 in BERT
            models): on SST-2 with MiniLM, 0.1 trains well while 0.3 and more make the model collapse to one class.
        alpha: PGD step size.
        steps: PGD ascent steps K.
        weight: factor of the adversarial loss.

    Example::

        trainer = Trainer(callbacks=[AdversarialTraining(method="pgd", epsilon=0.1, alpha=0.03, steps=3)])
    """

    supports_sequence_packing = False

    def __init__(
        self,
        method: Literal["fgm", "pgd"] = "fgm",
        epsilon: float = 0.1,
        alpha: float = 0.03,
        steps: int = 3,
        weight: float = 1.0,
    ) -> None:
        if method not in ("fgm", "pgd"):
            raise LightningPeftError(f"AdversarialTraining.method: 'fgm' or 'pgd', got {method!r}")
        for name, value in (("epsilon", epsilon), ("alpha", alpha), ("weight", weight)):
            if not value > 0:
                raise LightningPeftError(f"AdversarialTraining.{name}: must be > 0, got {value}")
        if steps < 1:
            raise LightningPeftError(f"AdversarialTraining.steps: must be a positive integer, got {steps}")
        self.method = method
        self.epsilon = epsilon
        self.alpha = alpha
        self.steps = steps
        self.weight = weight
        self._hooks: list[Any] = []
        self._recorded: list[torch.Tensor] = []  # embedding outputs of the step's clean pass, in call order
        self._deltas: list[torch.Tensor] | None = None  # perturbations to add, in call order, when perturbing
        self._calls = 0  # embedding calls of the perturbed pass so far

    # -- lifecycle ---------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Attach the embedding hooks and the loss term. Done here, before any ``on_fit_start``, so that a
        learning-rate range test (``training.lr: auto``, run at fit start with Lightning's finder as the only
        callback) trains the objective the fit trains."""
        if stage != "fit":
            return
        if not isinstance(pl_module, LossTermTask):
            raise LightningPeftError(f"AdversarialTraining: needs a lightning-peft task, got {type(pl_module)}")
        self._hooks = [layer.register_forward_hook(self._on_embeddings)
                       for layer in pl_module.input_embedding_layers("AdversarialTraining")]
        pl_module.loss_terms[ADVERSARIAL_TERM] = lambda batch, loss: self.adversarial_loss(pl_module, batch, loss)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._recorded = []  # what a pass outside a training step may have left (the range test has no such hook)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._detach(pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._detach(pl_module)

    def _detach(self, pl_module: LightningModule) -> None:
        """Undo :meth:`setup` (whatever part of it ran): hooks, the loss term, what was recorded."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._recorded = [], []
        if isinstance(pl_module, LossTermTask):
            pl_module.loss_terms.pop(ADVERSARIAL_TERM, None)

    # -- the perturbation --------------------------------------------------------------------------------
    def _on_embeddings(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self._deltas is not None:  # perturbed pass
            self._calls += 1
            return output + self._deltas[self._calls - 1].to(output.dtype)
        if torch.is_grad_enabled():  # clean pass: make the output a point we can differentiate the loss at
            if not output.requires_grad:
                output = output.detach().requires_grad_()  # frozen embeddings: no graph above this point
            self._recorded.append(output)
            return output
        return None  # evaluation: outputs unchanged

    def perturbed_loss(self, pl_module: LossTermTask, batch: Batch, deltas: list[torch.Tensor]) -> torch.Tensor:
        """The task loss with ``deltas[i]`` added to the i-th embedding output of the pass."""
        self._deltas, self._calls = deltas, 0
        try:
            return pl_module.batch_loss(batch)
        finally:
            self._deltas = None

    def adversarial_loss(self, pl_module: LossTermTask, batch: Batch, clean_loss: torch.Tensor) -> torch.Tensor:
        """``weight`` × the task loss at the FGM / PGD perturbation of the clean pass's embedding outputs."""
        recorded, self._recorded = self._recorded, []
        if not recorded:
            raise LightningPeftError(
                "AdversarialTraining: the training step never ran the input-embedding layer "
                "(does the task's forward bypass get_input_embeddings()?)"
            )
        grads = torch.autograd.grad(clean_loss, recorded, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(e) if g is None else g for e, g in zip(recorded, grads, strict=True)]
        if self.method == "fgm":
            deltas = [self.epsilon * per_example_unit(g) for g in grads]
        else:
            deltas = [torch.zeros_like(e) for e in recorded]
            for _ in range(self.steps):
                deltas = [d.requires_grad_() for d in deltas]
                loss = self.perturbed_loss(pl_module, batch, deltas)
                steps = torch.autograd.grad(loss, deltas, allow_unused=True)
                deltas = [
                    project(d.detach() + self.alpha * per_example_unit(torch.zeros_like(d) if g is None else g),
                            self.epsilon)
                    for d, g in zip(deltas, steps, strict=True)
                ]
        return self.weight * self.perturbed_loss(pl_module, batch, [d.detach() for d in deltas])
