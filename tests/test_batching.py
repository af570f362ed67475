"""Batching strategies: packed rows, length-sorted micro-batches and one padded pass give the same loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import LoraConfig

from lightning_peft import LightningPeftError, SequenceClassifier, TokenClassifier
from lightning_peft.batching import MicroBatches, PaddedPass, SequencePacking, choose_batching, pack


def padded_batch(lengths: list[int], vocab: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(5, vocab, (length,), generator=generator)
        mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids)}


def loss_and_grads(model, batch, micro_batch_size, packing=False):
    """The loss and gradients of ``batch`` computed the way ``choose_batching`` picks for these settings."""
    model.training_config = dataclasses.replace(
        model.training_config, micro_batch_size=micro_batch_size, sequence_packing=packing
    )
    model.batching = None  # chosen again on this batch
    model.zero_grad()
    loss = model.batch_loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def task_and_batch(backbone, task, lengths, **kwargs):
    """A classifier or tagger with a non-zero LoRA B (real gradients) and a labelled batch of ``lengths``."""
    torch.manual_seed(0)
    batch = padded_batch(lengths)
    lora = LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False)
    if task == "classification":
        model = SequenceClassifier(backbone, lora, labels=["a", "b", "c"], **kwargs)
        batch["labels"] = torch.arange(len(lengths)) % 3
    else:
        model = TokenClassifier(backbone, lora, labels=["O", "B-X", "I-X"], **kwargs)
        labels = torch.randint(0, 3, batch["input_ids"].shape)
        labels[batch["attention_mask"] == 0] = -100
        labels[:, 0] = -100
        batch["labels"] = labels
    model.eval()  # no dropout, so every way of computing the batch sees the same function
    return model, batch


def assert_same_loss_and_grads(model, batch, **way):
    full_loss, full_grads = loss_and_grads(model, batch, None)
    loss, grads = loss_and_grads(model, batch, **way)
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(full_grads) and full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("task", ["classification", "tagging"])
def test_micro_batches_give_the_full_batch_loss_and_gradients(backbone, task):
    model, batch = task_and_batch(backbone, task, [3, 17, 5, 9, 2, 12, 7, 4, 15, 6])
    assert_same_loss_and_grads(model, batch, micro_batch_size=3)
    assert isinstance(model.batching, MicroBatches) and model.batching.size == 3


@pytest.mark.parametrize("task", ["classification", "tagging"])
def test_packed_rows_give_the_full_batch_loss_and_gradients(backbone, task):
    model, batch = task_and_batch(backbone, task, [3, 17, 5, 9, 2, 12, 7, 4, 15, 6])
    calls = []
    model.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                          with_kwargs=True)
    assert_same_loss_and_grads(model, batch, micro_batch_size=None, packing=True)
    assert isinstance(model.batching, SequencePacking) and isinstance(model.batching.fallback, PaddedPass)
    # the padded pass, the one-row packing check (8 examples: 59 tokens) and the packed pass: 80 tokens in 5 rows of 17
    assert calls[-3:] == [torch.Size([8, 17]), torch.Size([1, 59]), torch.Size([5, 17])]


def test_packed_rows_with_rdrop_give_the_full_batch_loss(backbone):
    rdrop = {"regularization": {"rdrop_alpha": 1.0}}
    model, batch = task_and_batch(backbone, "tagging", [3, 11, 5, 2, 9], training=rdrop)
    assert_same_loss_and_grads(model, batch, micro_batch_size=None, packing=True)


def test_packing_gives_eager_attention_an_additive_mask(backbone):
    model, batch = task_and_batch(backbone, "classification", [3, 9, 5, 2, 7])
    model.model.get_base_model().set_attn_implementation("eager")
    assert pack(model, batch).inputs["attention_mask"].dtype == torch.float32
    assert_same_loss_and_grads(model, batch, micro_batch_size=None, packing=True)
    assert isinstance(model.batching, SequencePacking)


def test_packing_reproduces_roberta_style_position_ids(tmp_path):
    from transformers import RobertaConfig, RobertaModel

    from lightning_peft import BackboneConfig

    config = RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=40, pad_token_id=1,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    RobertaModel(config).save_pretrained(tmp_path)
    model, batch = task_and_batch(BackboneConfig(str(tmp_path)), "classification", [3, 9, 5, 2])
    assert_same_loss_and_grads(model, batch, micro_batch_size=None, packing=True)
    assert isinstance(model.batching, SequencePacking)


def test_packing_falls_back_to_micro_batches_when_outputs_differ(backbone, monkeypatch):
    import lightning_peft.batching as batching

    monkeypatch.setattr(batching, "position_offset", lambda model: 3)  # positions shifted: the check must notice
    model, batch = task_and_batch(backbone, "classification", [3, 17, 5, 9, 2, 12])
    with pytest.warns(UserWarning, match=r"sequence_packing: BertForSequenceClassification gives other outputs on "
                                         r"packed rows .*; training uses length-sorted micro-batches of 2 rows"):
        assert_same_loss_and_grads(model, batch, micro_batch_size=2, packing=True)
    assert isinstance(model.batching, MicroBatches)


def test_packing_falls_back_when_the_model_rejects_packed_rows(tmp_path):
    from transformers import LongformerConfig, LongformerModel

    from lightning_peft import BackboneConfig

    config = LongformerConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=64, attention_window=[4], pad_token_id=1)
    torch.manual_seed(0)
    LongformerModel(config).save_pretrained(tmp_path)
    model, batch = task_and_batch(BackboneConfig(str(tmp_path)), "classification", [3, 9, 5, 2])
    with pytest.warns(UserWarning, match=r"sequence_packing: LongformerForSequenceClassification fails on packed "
                                         r"rows \(IndexError"):  # its attention takes only a 2-D padding mask
        assert_same_loss_and_grads(model, batch, micro_batch_size=2, packing=True)
    assert isinstance(model.batching, MicroBatches)


def test_prompt_tuning_trains_without_packing(backbone):
    from peft import PromptTuningConfig

    model = SequenceClassifier(backbone, PromptTuningConfig(num_virtual_tokens=3), labels=["a", "b"])
    batch = {**padded_batch([4, 2, 3]), "labels": torch.tensor([0, 1, 0])}
    with pytest.warns(UserWarning, match="prompt and prefix tuning add virtual tokens to every row"):
        assert model.batch_loss(batch).isfinite()
    assert isinstance(model.batching, MicroBatches)


def test_micro_batches_skip_left_padded_batches(backbone):
    model = SequenceClassifier(backbone, LoraConfig(r=2, target_modules=["query"]), labels=["a", "b"])
    batch = padded_batch([4, 2, 3])
    batch["attention_mask"] = batch["attention_mask"].flip(1)
    batch["input_ids"] = batch["input_ids"].flip(1)
    batch["labels"] = torch.tensor([0, 1, 0])
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    MicroBatches(1).loss(model, batch)
    assert len(calls) == 1, "left padding cannot be trimmed from the right: one pass over the whole batch"


def test_micro_batch_size_must_be_positive(backbone):
    with pytest.raises(LightningPeftError, match="micro_batch_size"):
        SequenceClassifier(backbone, labels=["a", "b"], training={"micro_batch_size": 0})


@pytest.mark.parametrize("way", [{"micro_batch_size": None}, {"micro_batch_size": 3},
                                 {"micro_batch_size": None, "packing": True}], ids=["padded", "micro", "packed"])
def test_the_tagger_optimises_the_hf_trainer_loss(backbone, way):
    """What the HF Trainer minimises for token classification is the transformers model's own loss: one mean over
    the labelled tokens of the whole batch (not a mean of per-row or per-micro-batch means, which would weight the
    tokens of short sentences more). Every way of computing our batch gives that number."""
    model, batch = task_and_batch(backbone, "tagging", [3, 17, 5, 9, 2, 12, 7, 4, 15, 6])
    with torch.no_grad():
        hf_loss = model.model(**batch).loss
    loss, _ = loss_and_grads(model, batch, **way)
    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-6)


def test_a_callback_that_cannot_work_with_packed_rows_declares_it(backbone, caplog):
    """The task asks its callbacks (``supports_sequence_packing = False``) and says in the log why it does not pack;
    the callback never touches the task's settings."""
    import logging

    from lightning_peft.callbacks import AdversarialTraining

    model, batch = task_and_batch(backbone, "classification", [3, 9, 5, 2, 7])
    trainer = type("Trainer", (), {"callbacks": [AdversarialTraining()]})()
    model._trainer = trainer
    with caplog.at_level(logging.INFO):
        strategy = choose_batching(model, batch, model.packing_blocker())
    assert isinstance(strategy, MicroBatches) and model.training_config.sequence_packing
    assert ("training batches: length-sorted micro-batches of 16 rows (AdversarialTraining cannot work with packed "
            "rows)") in caplog.text
