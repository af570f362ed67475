"""Sequence packing: a batch's examples laid end to end in a few rows, each attending only to itself.

A random batch of 32 SST-2 sentences holds about 3x more padding than text; packed, the same examples fill a
handful of rows with almost no padding, so the transformer computes (nearly) only real tokens while the optimizer
still sees exactly the batch it was given. Each packed example keeps its own position ids and a block-diagonal
attention mask, and the encoder's output is put back in the padded layout, so the task head, the loss and the
metrics run unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import PeftModel

#: batch entries laid out in packed rows (the attention mask becomes block-diagonal, position ids are added)
PACKED_KEYS = ("input_ids", "token_type_ids")


@dataclass
class PackedRows:
    """A right-padded batch of ``num_examples`` examples, at most ``width`` tokens long, packed into fewer rows.

    Attributes:
        inputs: ``input_ids`` (and ``token_type_ids``) and ``position_ids`` of shape (rows, row width) and a
            boolean ``attention_mask`` of shape (rows, 1, row width, row width): a token sees another only within
            its own example (filler positions see themselves, so no attention row is empty).
        source: for each (example, position < ``width``) of the padded layout, flattened, its index in the
            flattened packed rows; padding positions point one past the end (zeros when unpacking).
    """

    inputs: dict[str, torch.Tensor]
    source: torch.Tensor
    num_examples: int
    width: int

    @property
    def num_rows(self) -> int:
        return int(self.inputs["input_ids"].shape[0])

    def unpack(self, hidden: torch.Tensor) -> torch.Tensor:
        """Packed states (k × rows, row width, …) in the padded layout (k × examples, ``width``, …), zeros at
        padding; ``k`` > 1 when the packed rows were repeated (R-Drop's doubled batch)."""
        copies = hidden.shape[0] // self.num_rows
        size = self.inputs["input_ids"].numel()
        flat = hidden.reshape(copies * size, *hidden.shape[2:])
        flat = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])
        index = torch.cat([torch.where(self.source < size, self.source + copy * size, copies * size)
                           for copy in range(copies)])
        return flat[index].view(copies * self.num_examples, self.width, *hidden.shape[2:])


def pack_rows(
    batch: dict[str, torch.Tensor],
    capacity: int | None = None,
    position_offset: int = 0,
    mask_dtype: torch.dtype | None = None,
) -> PackedRows:
    """Pack the examples of a right-padded ``batch`` (first fit, longest first) into rows of ``capacity`` positions
    (default: the longest example, so the packed rows are never wider than the trimmed padded batch).

    ``position_offset`` is where the model's position ids start (RoBERTa-style models count from
    ``padding_idx + 1``). The attention mask is boolean (what fused attention takes), or additive in
    ``mask_dtype`` (0 or the dtype's minimum: what eager attention adds to its scores).

    Example::

        packed = pack_rows({"input_ids": ids, "attention_mask": mask})
        hidden = encoder(**packed.inputs).last_hidden_state
        packed.unpack(hidden)  # (len(ids), packed.width, hidden size), as if ids[:, :packed.width] had been run
    """
    lengths = batch["attention_mask"].sum(1)
    device = lengths.device
    width = int(lengths.max())
    capacity, num_rows, examples, offsets, packed = _first_fit(lengths, capacity)
    padded = examples * width + offsets  # each real token's flat position in the padded layout
    size = num_rows * capacity

    def scatter(values: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.full((size,), fill, dtype=values.dtype, device=device).index_copy(0, packed, values)

    inputs = {key: scatter(batch[key][:, :width].reshape(-1)[padded], 0) for key in PACKED_KEYS if key in batch}
    inputs["position_ids"] = scatter(offsets + position_offset, 0)
    inputs = {key: value.view(num_rows, capacity) for key, value in inputs.items()}
    segment = scatter(examples, -1).view(num_rows, capacity)
    same_example = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0)
    itself = torch.eye(capacity, dtype=torch.bool, device=device)
    allowed = (same_example | itself)[:, None]
    if mask_dtype is not None:
        allowed = torch.zeros(allowed.shape, dtype=mask_dtype, device=device).masked_fill(
            ~allowed, torch.finfo(mask_dtype).min
        )
    inputs["attention_mask"] = allowed
    source = torch.full((len(lengths) * width,), size, dtype=torch.long, device=device).index_copy(0, padded, packed)
    return PackedRows(inputs=inputs, source=source, num_examples=len(lengths), width=width)


def _first_fit(
    lengths: torch.Tensor, capacity: int | None
) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the examples of ``lengths`` go in rows of ``capacity`` positions (default and minimum: the longest), first
    fit, longest first: ``(capacity, rows, example, offset, packed)``, the last three per real token (in example
    order): its example, its position in the example and its flat position in the packed rows."""
    device = lengths.device
    capacity = max(capacity or 0, int(lengths.max()))
    used: list[int] = []  # positions taken in each packed row
    starts = [0] * len(lengths)  # flat packed position of each example's first token
    for example in lengths.argsort(descending=True, stable=True).tolist():
        length = int(lengths[example])
        row = next((r for r, taken in enumerate(used) if taken + length <= capacity), len(used))
        if row == len(used):
            used.append(0)
        starts[example] = row * capacity + used[row]
        used[row] += length
    examples = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    offsets = torch.arange(len(examples), device=device) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    packed = torch.tensor(starts, device=device)[examples] + offsets
    return capacity, len(used), examples, offsets, packed


@dataclass
class PositionPackedRows:
    """A right-padded decoder batch packed into rows for transformers' own packed-sequence route: ``inputs`` holds
    the per-token entries (``input_ids``, ``labels``, …) laid out in rows and ``position_ids`` restarting at 0 for
    every example, and no attention mask, from which transformers builds a causal mask per example (only when no
    cache is used: call the model with ``use_cache=False``). Filler positions are one-token sequences whose labels
    are -100. ``order`` gives each packed position its place in the padded layout (example × width + position;
    filler past the end), to compare packed and padded outputs."""

    inputs: dict[str, torch.Tensor]
    order: torch.Tensor


def pack_by_position_ids(batch: dict[str, torch.Tensor], keys: tuple[str, ...], fill: dict[str, int],
                         capacity: int | None = None) -> PositionPackedRows:
    """Pack the examples of a right-padded decoder ``batch`` (first fit, longest first) into rows of ``capacity``
    positions (default: the longest example); ``keys`` are the per-token entries to lay out, ``fill`` their filler
    values (0 for ids, -100 for labels).

    Example::

        packed = pack_by_position_ids(batch, ("input_ids", "labels"), {"labels": -100})
        logits = model(**packed.inputs, use_cache=False).logits  # labels are shifted by the caller
    """
    lengths = batch["attention_mask"].sum(1)
    width = int(lengths.max())
    capacity, num_rows, examples, offsets, packed = _first_fit(lengths, capacity)
    padded = examples * width + offsets
    size = num_rows * capacity

    def scatter(values: torch.Tensor, filler: int) -> torch.Tensor:
        out = torch.full((size,), filler, dtype=values.dtype, device=values.device)
        return out.index_copy(0, packed, values).view(num_rows, capacity)

    inputs = {key: scatter(batch[key][:, :width].reshape(-1)[padded], fill.get(key, 0)) for key in keys if key in batch}
    inputs["position_ids"] = scatter(offsets, 0)
    order = scatter(padded, len(lengths) * width)
    return PositionPackedRows(inputs=inputs, order=order)


@contextmanager
def unpacked_output(encoder: torch.nn.Module, packed: PackedRows) -> Iterator[None]:
    """While active, ``encoder``'s output hidden states (first output) are returned in the padded layout."""

    def unpack(module: torch.nn.Module, args: object, output: object) -> object:
        if isinstance(output, torch.Tensor):
            return packed.unpack(output)
        if isinstance(output, tuple):
            return (packed.unpack(output[0]), *output[1:])
        output.last_hidden_state = packed.unpack(output.last_hidden_state)  # a transformers ModelOutput
        return output

    handle = encoder.register_forward_hook(unpack)
    try:
        yield
    finally:
        handle.remove()


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a ``PeftModel`` (the model itself otherwise)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def find_encoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module producing the final hidden states of a (PEFT-wrapped) transformers encoder model: its base
    model's ``encoder`` (BERT, RoBERTa, DeBERTa, ELECTRA…) or ``transformer`` (DistilBERT); ``None`` without one."""
    model = unwrapped(model)
    if getattr(model.config, "is_encoder_decoder", False):
        return None
    base = getattr(model, "base_model", model)
    candidates = (getattr(base, name, None) for name in ("encoder", "transformer"))
    return next((module for module in candidates if isinstance(module, torch.nn.Module)), None)


def mask_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """``None`` (boolean masks) for fused attention; the weights' dtype (additive masks) for eager attention."""
    implementation = getattr(getattr(unwrapped(model), "config", None), "_attn_implementation", None)
    return next(model.parameters()).dtype if implementation == "eager" else None


def position_offset(model: torch.nn.Module) -> int:
    """The first position id of a sequence: ``padding_idx + 1`` in RoBERTa-style embeddings, which count positions
    from after the padding index, 0 otherwise."""
    model = unwrapped(model)
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    return padding_idx + 1 if isinstance(padding_idx, int) else 0
