"""How a task trains — learning rate and schedule, batching, regularisation — as one ``training`` argument."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Literal

from peft import PeftConfig, PeftType
from transformers import SchedulerType

from lightning_peft.errors import LightningPeftError
from lightning_peft.regularization import Regularization, as_regularization

FULL_FINE_TUNING = "full fine-tuning"

#: AdamW learning rates that train well per PEFT method, from the SST-2 probes in benchmarks/README.md (one epoch,
#: batch 32, MiniLM) and the CoNLL-2003 runs: methods whose update starts small (AdaLoRA's zero singular values,
#: IA3's and VeRA's scaling vectors, soft prompts) need larger steps than LoRA; full fine-tuning uses the HF
#: ``Trainer``'s 5e-5, since a rate that suits a small adapter wrecks the pretrained weights.
DEFAULT_LEARNING_RATES: dict[str, float] = {
    FULL_FINE_TUNING: 5e-5,
    PeftType.LORA.value: 2e-3,
    PeftType.ADALORA.value: 3e-2,
    PeftType.IA3.value: 2e-2,
    PeftType.LOHA.value: 9e-3,
    PeftType.LOKR.value: 9e-3,
    PeftType.VERA.value: 5e-2,
    PeftType.PROMPT_TUNING.value: 9e-2,
    PeftType.P_TUNING.value: 9e-3,
    PeftType.PREFIX_TUNING.value: 1e-2,
}
#: for a PEFT method without a measured rate: torch's AdamW default
FALLBACK_LEARNING_RATE = 1e-3
#: ``training.lr`` that asks for a range test before fit (:class:`lightning_peft.callbacks.LearningRateSearch`)
AUTO = "auto"


def method_name(peft: PeftConfig | None) -> str:
    """``LORA``, ``IA3``, … (peft's ``PeftType`` value), or ``full fine-tuning`` without a PEFT config."""
    if peft is None:
        return FULL_FINE_TUNING
    peft_type = peft.peft_type
    return peft_type.value if isinstance(peft_type, PeftType) else str(peft_type)


def default_learning_rate(peft: PeftConfig | None) -> float:
    """The learning rate :data:`DEFAULT_LEARNING_RATES` gives the method of ``peft`` (1e-3 for one it lacks)."""
    return DEFAULT_LEARNING_RATES.get(method_name(peft), FALLBACK_LEARNING_RATE)


@dataclass
class TrainingConfig:
    """How a task trains: one ``training`` argument shared by every task, each option with one default.

    Args:
        lr: the peak learning rate; ``null`` takes the PEFT method's default (:data:`DEFAULT_LEARNING_RATES`: LoRA
            2e-3, AdaLoRA 3e-2, IA3 2e-2, prompt tuning 9e-2, full fine-tuning 5e-5, …), logged at fit start and
            written to the model card. ``auto`` runs a learning-rate range test before fit and trains with the rate
            it points to (see :class:`~lightning_peft.callbacks.LearningRateSearch`). The optimizer's own ``lr`` is
            not used.
        lr_scheduler_type: a ``transformers.get_scheduler`` name (``linear``, ``cosine``, ``constant_with_warmup``…),
            stepped once per optimizer step.
        warmup_ratio: fraction of the optimizer steps spent warming the learning rate up from 0.
        micro_batch_size: compute each training batch in length-sorted micro-batches of this many rows, each
            trimmed to its own padding (same examples and loss per optimizer step, less padding computed);
            ``null`` runs the batch in one piece. Used where sequence packing is off or not possible.
        sequence_packing: compute each training batch with its examples packed end to end in a few rows, each
            attending only to itself (see :mod:`lightning_peft.packing`), where the task supports it (not seq2seq):
            same examples and loss, almost no padding computed. Checked once on the first batch: a model whose
            packed outputs differ from its padded ones trains in micro-batches, with a warning saying why.
        regularization: label smoothing, R-Drop and L2 on the trainable weights (see :class:`Regularization`).

    Example::

        SequenceClassifier(backbone, peft, labels, training=TrainingConfig(lr=1e-3, warmup_ratio=0.06))

    or in YAML: ``model.init_args.training: {lr: 1.0e-3, warmup_ratio: 0.06, regularization: {rdrop_alpha: 1.0}}``.
    """

    lr: float | Literal["auto"] | None = None
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    micro_batch_size: int | None = 16
    sequence_packing: bool = True
    regularization: Regularization = field(default_factory=Regularization)

    def __post_init__(self) -> None:
        self.regularization = as_regularization(self.regularization)
        if isinstance(self.lr, str) and self.lr != AUTO:
            raise LightningPeftError(f"model.init_args.training.lr: must be a number, auto or null, got {self.lr!r}")
        if isinstance(self.lr, (int, float)) and not self.lr >= 0:
            raise LightningPeftError(f"model.init_args.training.lr: must be >= 0, auto or null, got {self.lr}")
        schedulers = [kind.value for kind in SchedulerType]
        if self.lr_scheduler_type not in schedulers:
            raise LightningPeftError(
                f"model.init_args.training.lr_scheduler_type: {self.lr_scheduler_type!r} is not a transformers "
                f"scheduler; use one of {', '.join(schedulers)}"
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise LightningPeftError(
                f"model.init_args.training.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}"
            )
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise LightningPeftError(
                "model.init_args.training.micro_batch_size: must be a positive integer or null, "
                f"got {self.micro_batch_size}"
            )

    @property
    def searches_learning_rate(self) -> bool:
        """Whether ``lr`` is ``auto``."""
        return self.lr == AUTO

    @property
    def uses_method_default(self) -> bool:
        """Whether :meth:`learning_rate` is the method's default: ``lr`` is ``null``, or ``auto`` (until a search
        finds a rate)."""
        return self.lr is None or self.searches_learning_rate

    def learning_rate(self, peft: PeftConfig | None) -> float:
        """``lr``, or the default of ``peft``'s method when it is ``null`` (or ``auto``, until a search finds one)."""
        return default_learning_rate(peft) if self.uses_method_default else float(self.lr)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def as_training_config(value: TrainingConfig | dict[str, Any] | None) -> TrainingConfig:
    if value is None:
        return TrainingConfig()
    return TrainingConfig(**value) if isinstance(value, dict) else value


def optimizer_class(factory: Any) -> type | None:
    """The optimizer class behind a factory: the class itself, or the one a ``functools.partial`` wraps (directly,
    or as LightningCLI's ``OptimizerCallable`` does, as its first positional argument); ``None`` for a lambda."""
    candidates = [factory, getattr(factory, "func", None), *getattr(factory, "args", ())]
    return next((c for c in candidates if isinstance(c, type)), None)


def explicit_optimizer_lr(factory: Any) -> float | None:
    """The ``lr`` an optimizer factory (a class, ``functools.partial`` or LightningCLI's ``OptimizerCallable``) was
    given, unless it is the optimizer class's own default (which LightningCLI fills in): ``None`` otherwise."""
    keywords = getattr(factory, "keywords", None) or {}
    if "lr" not in keywords:
        return None
    cls = optimizer_class(factory)
    default = inspect.signature(cls).parameters.get("lr") if cls is not None else None
    if default is not None and keywords["lr"] == default.default:
        return None
    return float(keywords["lr"])


OPTIMIZER_FACTS = ("lr", "weight_decay", "betas", "momentum")


def optimizer_summary(factory: Any, lr: float) -> str:
    """``AdamW(lr=0.002, weight_decay=0.01, …)`` for an optimizer class or a ``functools.partial`` of one (what
    ``functools.partial`` and LightningCLI's ``OptimizerCallable`` give), called with learning rate ``lr``."""
    cls = optimizer_class(factory)
    keywords = {**(getattr(factory, "keywords", {}) or {}), "lr": lr}
    facts = ", ".join(f"{k}={keywords[k]}" for k in OPTIMIZER_FACTS if k in keywords)
    return f"{cls.__name__ if cls else 'optimizer'}({facts})"
