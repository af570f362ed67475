"""Sequence packing: rows, masks, positions, and the way back to the padded layout."""

from __future__ import annotations

import torch

from lightning_peft.packing import pack_rows


def right_padded(lengths: list[int]) -> dict[str, torch.Tensor]:
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = 100 * (row + 1) + torch.arange(length)  # row r, token t → 100(r+1) + t
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": mask * (torch.arange(width) % 2)}


def test_examples_are_packed_longest_first_into_the_first_row_with_room():
    packed = pack_rows(right_padded([2, 5, 3, 1]))  # capacity = longest = 5
    assert packed.inputs["input_ids"].tolist() == [
        [200, 201, 202, 203, 204],  # 5 fills row 0
        [300, 301, 302, 100, 101],  # 3, then 2
        [400, 0, 0, 0, 0],  # 1
    ]
    assert packed.inputs["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1], [0, 0, 0, 0, 0]]
    assert packed.inputs["token_type_ids"].tolist() == [[0, 1, 0, 1, 0], [0, 1, 0, 0, 1], [0, 0, 0, 0, 0]]
    assert packed.width == 5 and packed.num_examples == 4


def test_each_token_attends_only_within_its_example():
    mask = pack_rows(right_padded([2, 5, 3, 1])).inputs["attention_mask"]
    assert mask.shape == (3, 1, 5, 5) and mask.dtype == torch.bool
    row = mask[1, 0].int().tolist()  # examples of length 3 and 2
    assert row == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]
    filler = mask[2, 0]
    assert filler[0].int().tolist() == [1, 0, 0, 0, 0]
    assert torch.equal(filler[1:, 1:], torch.eye(4, dtype=torch.bool)), "filler sees only itself: no empty row"


def test_position_offset_shifts_every_example():
    packed = pack_rows(right_padded([3, 2]), capacity=5, position_offset=2)
    assert packed.inputs["position_ids"].tolist() == [[2, 3, 4, 2, 3]]


def test_unpack_restores_the_padded_layout_with_zeros_at_padding():
    batch = right_padded([2, 5, 3, 1])
    packed = pack_rows(batch, capacity=7)
    hidden = torch.stack([packed.inputs["input_ids"].float(), -packed.inputs["input_ids"].float()], -1)
    unpacked = packed.unpack(hidden)
    expected = batch["input_ids"].float() * batch["attention_mask"]
    assert unpacked.shape == (4, 5, 2)
    assert torch.equal(unpacked[..., 0], expected) and torch.equal(unpacked[..., 1], -expected)


def test_unpack_of_repeated_rows_gives_repeated_examples():
    batch = right_padded([4, 1, 2])
    packed = pack_rows(batch)
    ids = packed.inputs["input_ids"].float()[..., None]
    unpacked = packed.unpack(torch.cat([ids, ids + 0.5]))  # R-Drop runs the doubled rows in one forward
    expected = (batch["input_ids"].float() * batch["attention_mask"])[..., None]
    assert torch.equal(unpacked, torch.cat([expected, (expected + 0.5) * batch["attention_mask"][..., None]]))


def test_unpacking_passes_gradients_to_the_packed_states():
    packed = pack_rows(right_padded([3, 1, 2]))
    hidden = torch.randn(packed.inputs["input_ids"].shape[0], packed.width, 4, requires_grad=True)
    packed.unpack(hidden).sum().backward()
    assert torch.equal(hidden.grad[..., 0] != 0, packed.inputs["attention_mask"][:, 0].diagonal(dim1=1, dim2=2)
                       & (packed.inputs["input_ids"] != 0))
