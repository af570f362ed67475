"""Batching strategies: the ways a training batch's loss is computed, chosen once per fit.

Every strategy gives the optimizer exactly the batch it was given — same examples, same mean loss — and differs
only in how much padding the transformer computes:

- :class:`PaddedPass`: the padded batch in one forward pass;
- :class:`MicroBatches`: length-sorted micro-batches, each trimmed to its own longest row;
- :class:`SequencePacking`: an encoder's examples laid end to end in a few rows (see :mod:`lightning_peft.packing`);
- :class:`PositionIdPacking`: a decoder's examples laid end to end, separated by their position ids alone
  (transformers' own packed-sequence route).

:func:`choose_batching` picks one on the first training batch of a fit; a task computes its training loss with
``strategy.loss(task, batch)``. R-Drop, label smoothing and the other regularisers live in the task's
``training_loss``, so they compose with every strategy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Protocol

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from peft import PeftModel

from lightning_peft.packing import (
    PackedRows,
    PositionPackedRows,
    find_encoder,
    mask_dtype,
    pack_by_position_ids,
    pack_rows,
    position_offset,
    unpacked_output,
    unwrapped,
)
from lightning_peft.training import TrainingConfig
from lightning_peft.types import IGNORE_INDEX, Batch


class BatchedTask(Protocol):
    """What a strategy needs from a task (``PeftModule`` provides it)."""

    model: torch.nn.Module
    training_config: TrainingConfig
    packs_by_position_ids: bool
    sequence_keys: tuple[str, ...]

    def __call__(self, batch: Batch) -> torch.Tensor: ...

    def training_loss(self, batch: Batch) -> torch.Tensor: ...

    def loss_weight(self, batch: Batch) -> int: ...

    def micro_batch(self, batch: Batch, rows: torch.Tensor, width: int) -> Batch: ...

    def batch_size_of(self, batch: Batch) -> int: ...

    def modules(self) -> Iterator[torch.nn.Module]: ...

    def eval(self) -> torch.nn.Module: ...


class DecoderTask(BatchedTask, Protocol):
    """A task whose logits are per scored token (a decoder's next-token targets), as :class:`PositionIdPacking`
    needs it."""

    def scored_positions(self, batch: Batch) -> torch.Tensor:
        """Which (row, position) of ``batch`` the task's logits are computed at, row-major."""
        ...


class BatchingStrategy(ABC):
    """One way to compute a training batch's loss (the task's ``training_loss`` over the batch's examples)."""

    @abstractmethod
    def loss(self, task: BatchedTask, batch: Batch) -> torch.Tensor:
        """The batch's mean training loss, as ``task.training_loss`` of the whole padded batch would give it."""

    @abstractmethod
    def describe(self) -> str:
        """What the log says about it, e.g. ``length-sorted micro-batches of 16 rows``."""


def is_right_padded(mask: torch.Tensor) -> bool:
    """Whether every row of an attention mask is its real tokens followed by padding (what slicing needs)."""
    lengths = mask.sum(1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.equal(mask.bool(), positions < lengths[:, None])


class PaddedPass(BatchingStrategy):
    """The padded batch in one forward pass, as the HF ``Trainer`` computes it.

    Example::

        loss = PaddedPass().loss(task, batch)  # == task.training_loss(batch)
    """

    def loss(self, task: BatchedTask, batch: Batch) -> torch.Tensor:
        return task.training_loss(batch)

    def describe(self) -> str:
        return "one padded pass per batch"


class MicroBatches(BatchingStrategy):
    """Length-sorted micro-batches of ``size`` rows, each trimmed to its longest row; their losses are weighted by
    the task's loss units (examples, labelled tokens), so the result is the whole batch's mean loss.

    Example::

        loss = MicroBatches(16).loss(task, batch)
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def loss(self, task: BatchedTask, batch: Batch) -> torch.Tensor:
        lengths = batch["attention_mask"].sum(1)
        if len(lengths) <= self.size or not is_right_padded(batch["attention_mask"]):
            return task.training_loss(batch)
        total = 0.0
        for rows in lengths.argsort(descending=True, stable=True).split(self.size):
            chunk = task.micro_batch(batch, rows, width=int(lengths[rows].max()))
            total = total + task.training_loss(chunk) * task.loss_weight(chunk)
        return total / max(task.loss_weight(batch), 1)

    def describe(self) -> str:
        return f"length-sorted micro-batches of {self.size} rows"


class Packing(BatchingStrategy):
    """A batch's examples packed end to end in a few rows, each attending only to itself. A batch that is not
    right-padded goes to ``fallback``. Subclasses say how: :meth:`packed_logits`."""

    def __init__(self, fallback: BatchingStrategy) -> None:
        self.fallback = fallback

    def loss(self, task: BatchedTask, batch: Batch) -> torch.Tensor:
        if not is_right_padded(batch["attention_mask"]):
            return self.fallback.loss(task, batch)
        return self.packed_loss(task, batch)

    @abstractmethod
    def packed_loss(self, task: BatchedTask, batch: Batch) -> torch.Tensor:
        """``task.training_loss`` over the packed rows of a right-padded ``batch``."""

    @abstractmethod
    def packed_logits(self, task: BatchedTask, batch: Batch) -> torch.Tensor:
        """``task(batch)``'s logits computed on one packed row, in the order ``task(batch)`` gives them: what
        :func:`packing_problem` compares."""

    def describe(self) -> str:
        return "packed rows"


class SequencePacking(Packing):
    """An encoder's examples packed in rows with a block-diagonal attention mask; ``encoder``'s output is put back
    per example before the task's head, so the head, loss and metrics run unchanged.

    Example::

        strategy = SequencePacking(find_encoder(task.model), fallback=MicroBatches(16))
        loss = strategy.loss(task, batch)
    """

    def __init__(self, encoder: torch.nn.Module, fallback: BatchingStrategy) -> None:
        super().__init__(fallback)
        self.encoder = encoder

    def packed_loss(self, task: BatchedTask, batch: Batch) -> torch.Tensor:
        packed = pack(task, batch)
        with unpacked_output(self.encoder, packed):
            return task.training_loss(packed_batch(task, batch, packed))

    def packed_logits(self, task: BatchedTask, batch: Batch) -> torch.Tensor:
        packed = pack(task, batch, capacity=int(batch["attention_mask"].sum()))
        with unpacked_output(self.encoder, packed):
            return task(packed_batch(task, batch, packed))


class PositionIdPacking(Packing):
    """A decoder's examples packed in rows whose position ids restart at every example, with no attention mask:
    transformers then builds a causal mask per example itself (the task calls the model with ``use_cache=False``).
    The task's per-token entries (``sequence_keys``: ids, next-token targets) move with the tokens, so a task whose
    loss is over labelled tokens computes the same loss; filler positions carry no label.

    Example::

        loss = PositionIdPacking(fallback=PaddedPass()).loss(task, batch)
    """

    def packed_loss(self, task: BatchedTask, batch: Batch) -> torch.Tensor:
        return task.training_loss(self._packed(task, batch).inputs)

    def packed_logits(self, task: DecoderTask, batch: Batch) -> torch.Tensor:
        packed = self._packed(task, batch, capacity=int(batch["attention_mask"].sum()))
        logits = task(packed.inputs)
        order = packed.order[task.scored_positions(packed.inputs)]
        return logits[order.argsort()]  # back in the padded batch's (example, position) order

    @staticmethod
    def _packed(task: BatchedTask, batch: Batch, capacity: int | None = None) -> PositionPackedRows:
        keys = tuple(key for key in task.sequence_keys if key != "attention_mask")
        fill = {key: IGNORE_INDEX for key in keys if key != "input_ids"}
        return pack_by_position_ids(batch, keys, fill, capacity)


def pack(task: BatchedTask, batch: Batch, capacity: int | None = None) -> PackedRows:
    """``batch``'s examples packed in rows (see :func:`~lightning_peft.packing.pack_rows`) for the task's model."""
    return pack_rows(batch, capacity, position_offset(task.model), mask_dtype(task.model))


def packed_batch(task: BatchedTask, batch: Batch, packed: PackedRows) -> Batch:
    """``batch`` with the model inputs replaced by the ``packed`` rows; other entries (labels) stay per example,
    sequences cut to the longest example, and the per-example padding mask is kept as ``token_mask``."""
    rows = torch.arange(packed.num_examples, device=batch["input_ids"].device)
    per_example = task.micro_batch(batch, rows, packed.width)
    return {**per_example, "token_mask": per_example["attention_mask"], **packed.inputs}


def choose_batching(task: BatchedTask, batch: Batch, blocker: str | None = None) -> BatchingStrategy:
    """The strategy for this fit, from ``task.training_config`` and the first training ``batch``, logged once.

    Packed rows when ``sequence_packing`` is on, nothing blocks it (``blocker``: why the task or a callback cannot
    use them) and the model's outputs on one packed row equal its padded outputs (else a warning says why);
    otherwise micro-batches of ``micro_batch_size`` rows, or one padded pass when that is ``null``. Decoders
    (``task.packs_by_position_ids``) pack by position ids, encoders by their unpacked output.
    """
    options = task.training_config
    fallback: BatchingStrategy = MicroBatches(options.micro_batch_size) if options.micro_batch_size else PaddedPass()
    strategy, reason = fallback, None
    if options.sequence_packing:
        reason = blocker
        if reason is None:
            candidate, reason = packing_candidate(task, fallback)
            problem = reason or packing_problem(task, batch, candidate)
            if problem:
                rank_zero_warn(f"sequence_packing: {problem}; training uses {fallback.describe()} instead "
                               "(set model.init_args.training.sequence_packing: false to silence this)")
                reason = problem
            else:
                strategy = candidate
    rank_zero_info(f"training batches: {strategy.describe()}" + (f" ({reason})" if reason else ""))
    return strategy


def packing_candidate(task: BatchedTask, fallback: BatchingStrategy) -> tuple[Packing | None, str | None]:
    """How the task's model would train on packed rows, or why it cannot (prompt learning; an encoder task without an
    encoder module to unpack)."""
    model = task.model
    if isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning:
        return None, "prompt and prefix tuning add virtual tokens to every row, not to every packed example"
    if task.packs_by_position_ids:
        return PositionIdPacking(fallback), None
    encoder = find_encoder(model)
    if encoder is None:
        name = type(unwrapped(model)).__name__
        return None, f"{name} has no `encoder` (or `transformer`) module whose output could be unpacked"
    return SequencePacking(encoder, fallback), None


def packing_problem(task: BatchedTask, batch: Batch, strategy: Packing) -> str | None:
    """Why the task's model cannot train on packed rows the ``strategy``'s way, or ``None`` when it can: its outputs
    for the batch's first examples, packed into one row, must equal their padded outputs."""
    model = task.model
    name = type(unwrapped(model)).__name__
    if not is_right_padded(batch["attention_mask"]):
        return "the training batches are not right-padded"
    rows = torch.arange(min(8, task.batch_size_of(batch)), device=batch["input_ids"].device)
    sample = task.micro_batch(batch, rows, int(batch["attention_mask"][rows].sum(1).max()))
    # all in one row: positions must restart and attention stop at every example
    modes = {module: module.training for module in task.modules()}
    task.eval()
    try:
        with torch.no_grad():
            padded_logits = task(sample)  # outside the except: a failing padded forward is not a packing issue
            try:
                packed_logits = strategy.packed_logits(task, sample)
            except Exception as err:  # any failure on packed rows (Longformer: IndexError) means: do not pack
                return f"{name} fails on packed rows ({type(err).__name__}: {err})"
    finally:
        for module, training in modes.items():
            module.train(training)
    if padded_logits.dim() == 3:  # per-token outputs: compare real tokens only
        real = sample["attention_mask"].bool()
        padded_logits, packed_logits = padded_logits[real], packed_logits[real]
    difference = float((padded_logits.float() - packed_logits.float()).abs().max())
    scale = max(float(padded_logits.float().abs().max()), 1.0)
    device_type = batch["input_ids"].device.type
    exact = next(model.parameters()).dtype == torch.float32 and not torch.is_autocast_enabled(device_type)
    if difference > (1e-3 if exact else 5e-2) * scale:
        return f"{name} gives other outputs on packed rows than on padded ones (max difference {difference:.3g})"
    return None
