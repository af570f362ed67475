"""PeftModule mechanics shared by every task: length-grouped micro-batches."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from lightning_peft import LightningPeftError, SequenceClassifier, TokenClassifier


def padded_batch(lengths: list[int], vocab: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(5, vocab, (length,), generator=generator)
        mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids)}


def loss_and_grads(model, batch, micro_batch_size):
    model.micro_batch_size = micro_batch_size
    model.zero_grad()
    loss = model.length_grouped_loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("task", ["classification", "tagging"])
def test_micro_batches_give_the_full_batch_loss_and_gradients(backbone, task):
    torch.manual_seed(0)
    lengths = [3, 17, 5, 9, 2, 12, 7, 4, 15, 6]
    batch = padded_batch(lengths)
    lora = LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False)  # non-zero B: real grads
    if task == "classification":
        model = SequenceClassifier(backbone, lora, labels=["a", "b", "c"])
        batch["labels"] = torch.tensor([0, 1, 2, 1, 0, 2, 1, 0, 2, 1])
    else:
        model = TokenClassifier(backbone, lora, labels=["O", "B-X", "I-X"])
        labels = torch.randint(0, 3, batch["input_ids"].shape)
        labels[batch["attention_mask"] == 0] = -100
        labels[:, 0] = -100
        batch["labels"] = labels
    model.eval()  # no dropout, so both ways see the same function
    full_loss, full_grads = loss_and_grads(model, batch, None)
    micro_loss, micro_grads = loss_and_grads(model, batch, 3)
    torch.testing.assert_close(micro_loss, full_loss, rtol=1e-5, atol=1e-6)
    assert set(micro_grads) == set(full_grads) and full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(micro_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_micro_batches_skip_left_padded_batches(backbone):
    model = SequenceClassifier(backbone, LoraConfig(r=2, target_modules=["query"]), labels=["a", "b"])
    batch = padded_batch([4, 2, 3])
    batch["attention_mask"] = batch["attention_mask"].flip(1)
    batch["input_ids"] = batch["input_ids"].flip(1)
    batch["labels"] = torch.tensor([0, 1, 0])
    model.micro_batch_size = 1
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    model.length_grouped_loss(batch)
    assert len(calls) == 1, "left padding cannot be trimmed from the right: one pass over the whole batch"


def test_micro_batch_size_must_be_positive(backbone):
    with pytest.raises(LightningPeftError, match="micro_batch_size"):
        SequenceClassifier(backbone, labels=["a", "b"], micro_batch_size=0)
