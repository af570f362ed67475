"""Label smoothing, R-Drop and L2 on the trainable weights (``model.regularization``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig

from lightning_peft import BackboneConfig, LightningPeftError, SequenceClassifier, TokenClassifier, TrainingConfig
from lightning_peft.regularization import Regularization, kl_to_target, squared_l2, symmetric_kl
from tests.test_batching import padded_batch


def classifier(backbone: BackboneConfig, dropout: float = 0.0, **regularization) -> SequenceClassifier:
    backbone = dataclasses.replace(backbone, model_config={"hidden_dropout_prob": dropout})
    lora = LoraConfig(r=4, target_modules=["query", "value"], lora_dropout=dropout, init_lora_weights=False)
    torch.manual_seed(0)
    return SequenceClassifier(backbone, lora, labels=["a", "b", "c"], training={"regularization": regularization})


def labelled_batch() -> dict[str, torch.Tensor]:
    batch = padded_batch([5, 9, 3, 7])
    batch["labels"] = torch.tensor([0, 1, 2, 1])
    return batch


def test_symmetric_kl_matches_a_hand_computation():
    a, b = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    p, q = a.softmax(-1)[0], b.softmax(-1)[0]
    kl_pq = float((p * (p / q).log()).sum())
    kl_qp = float((q * (q / p).log()).sum())
    assert symmetric_kl(a, b).item() == pytest.approx((kl_pq + kl_qp) / 2)
    assert symmetric_kl(a, a).item() == 0.0
    mask = torch.tensor([[True, False]])
    assert symmetric_kl(torch.stack([a, a], 1), torch.stack([b, a], 1), mask).item() == pytest.approx(
        (kl_pq + kl_qp) / 2
    )


def test_kl_to_target_is_the_kl_from_a_fixed_target():
    target = torch.tensor([[0.0, 1.0], [2.0, 0.0]], requires_grad=True)
    logits = torch.tensor([[1.0, 0.0], [2.0, 0.0]], requires_grad=True)
    p, q = target.detach().softmax(-1), logits.detach().softmax(-1)
    divergence = kl_to_target(target, logits)
    assert divergence.item() == pytest.approx(float((p * (p / q).log()).sum(-1).mean()))
    divergence.backward()
    assert target.grad is None and logits.grad.abs().sum() > 0  # only the prediction moves toward the target
    assert kl_to_target(logits, logits).item() == 0.0


def test_rdrop_term_is_zero_without_dropout_and_positive_with_it(backbone):
    batch = labelled_batch()
    model = classifier(backbone, dropout=0.3, rdrop_alpha=1.0)
    model.eval()  # dropout off: both passes agree, so R-Drop is the plain loss
    plain = model.compute_loss(model(batch), batch)
    torch.testing.assert_close(model.training_loss(batch), plain)
    logits_a, logits_b = model({k: torch.cat([v, v]) for k, v in batch.items()}).chunk(2)
    assert model.rdrop_divergence(logits_a, logits_b, batch).item() == 0.0
    model.train()
    logits_a, logits_b = model({k: torch.cat([v, v]) for k, v in batch.items()}).chunk(2)
    assert model.rdrop_divergence(logits_a, logits_b, batch).item() > 1e-6


def test_rdrop_on_tagger_counts_only_labelled_positions(backbone):
    lora = LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False)
    model = TokenClassifier(
        backbone, lora, labels=["O", "B-X", "I-X"], training={"regularization": {"rdrop_alpha": 1.0}}
    )
    batch = padded_batch([4, 6])
    batch["labels"] = torch.full_like(batch["input_ids"], -100)
    batch["labels"][:, 1:3] = 1
    logits = model(batch)
    noise = torch.zeros_like(logits)
    noise[batch["labels"] == -100] = 5.0  # differences only where no label is: no divergence counted
    assert model.rdrop_divergence(logits, logits + noise.roll(1, -1), batch).item() == 0.0


def test_label_smoothing_applies_to_training_loss_only(backbone):
    batch = labelled_batch()
    model = classifier(backbone, label_smoothing=0.2)
    logits = model(batch)
    model.train()
    expected = F.cross_entropy(logits, batch["labels"], label_smoothing=0.2)
    torch.testing.assert_close(model.compute_loss(logits, batch), expected)
    model.eval()
    torch.testing.assert_close(model.compute_loss(logits, batch), F.cross_entropy(logits, batch["labels"]))


def test_trainable_l2_adds_the_squared_norm_of_trainable_weights_only(backbone):
    batch = labelled_batch()
    model = classifier(backbone, trainable_l2=0.5)
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) < len(list(model.parameters()))
    expected = model.batch_loss(batch) + 0.5 * sum(p.pow(2).sum() for p in trainable)
    with pytest.warns(UserWarning, match="self.log"):  # no trainer attached in this unit test
        torch.testing.assert_close(model.training_step(batch, 0), expected)
    assert squared_l2([torch.nn.Parameter(torch.tensor([3.0, 4.0]))]).item() == 25.0


@pytest.mark.parametrize(
    ("options", "field"),
    [({"label_smoothing": 1.0}, "label_smoothing"), ({"rdrop_alpha": -1}, "rdrop_alpha"),
     ({"trainable_l2": -0.1}, "trainable_l2")],
)
def test_bad_values_name_the_field(options, field):
    with pytest.raises(LightningPeftError, match=f"model.init_args.training.regularization.{field}"):
        Regularization(**options)


def test_regression_refuses_label_smoothing(backbone):
    with pytest.raises(LightningPeftError, match="regression has no classes"):
        SequenceClassifier(backbone, problem_type="regression", training={"regularization": {"label_smoothing": 0.1}})


def test_training_options_are_saved_as_plain_hyperparameters(backbone):
    training = TrainingConfig(regularization=Regularization(rdrop_alpha=2.0))
    model = SequenceClassifier(backbone, labels=["a", "b"], training=training)
    checkpoint = {"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    saved = checkpoint["hyper_parameters"]["training"]
    assert saved["regularization"] == {"label_smoothing": 0.0, "rdrop_alpha": 2.0, "trainable_l2": 0.0}
    # what load_from_checkpoint rebuilds, with the rate actually used (full fine-tuning's default here)
    assert TrainingConfig(**saved) == dataclasses.replace(training, lr=5e-5)
