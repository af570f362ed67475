from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import LoraConfig

from lightning_peft import ClassificationDataModule, LightningPeftError, SequenceClassifier, TrainingConfig
from tests.conftest import write_csv

LR = TrainingConfig(lr=1e-2)


def make_trainer(root: Path, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, default_root_dir=str(root), logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, max_epochs=1,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def toy_dm(tiny_bert_dir, toy_data, **kwargs) -> ClassificationDataModule:
    return ClassificationDataModule(
        tokenizer=str(tiny_bert_dir), train_file=str(toy_data["train"]), validation_file=str(toy_data["validation"]),
        test_file=str(toy_data["test"]), predict_file=str(toy_data["predict"]), batch_size=16, **kwargs,
    )


def test_learns_the_toy_task(backbone, tiny_bert_dir, toy_data, tmp_path):
    pl.seed_everything(0)
    dm = toy_dm(tiny_bert_dir, toy_data)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"])
    model = SequenceClassifier(backbone, lora, labels=dm.labels, training=TrainingConfig(lr=5e-3))
    trainer = make_trainer(tmp_path, max_epochs=12)
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]
    trainer.fit(model, datamodule=dm)
    after = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert after["test/loss"] < 0.5 * before["val/loss"]
    assert after["test/accuracy"] >= 0.9
    calibration = {"test/ece", "test/mce", "test/nll", "test/brier", "test/aurc"}
    assert set(after) == {"test/loss", "test/accuracy", "test/f1", *calibration}
    assert after["test/nll"] == pytest.approx(after["test/loss"], rel=1e-4)  # the same cross-entropy


def test_optimizer_groups_and_warmup_schedule(backbone, lora, tiny_bert_dir, toy_data, tmp_path):
    dm = toy_dm(tiny_bert_dir, toy_data)
    model = SequenceClassifier(backbone, lora, labels=dm.labels, training=TrainingConfig(lr=1e-2, warmup_ratio=0.5))
    trainer = make_trainer(tmp_path, max_epochs=2)
    trainer.fit(model, datamodule=dm)
    optimizer = trainer.optimizers[0]
    decay, no_decay = optimizer.param_groups
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.01
    assert all(p.ndim < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    scheduler = trainer.lr_scheduler_configs[0]
    assert scheduler.interval == "step"
    # linear schedule: warm-up over the first half of the 40 optimizer steps, then decay to 0
    assert trainer.global_step == 40 and optimizer.param_groups[0]["lr"] == pytest.approx(0.0)
    with pytest.raises(LightningPeftError, match="warmup_ratio"):
        SequenceClassifier(backbone, lora, labels=["a", "b"], training={"warmup_ratio": 1.5})


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "regression"])
def test_other_heads_train_and_predict(backbone, lora, tiny_bert_dir, tmp_path, problem_type):
    if problem_type == "regression":
        rows = [["good food", 4.5], ["bad room", 0.5], ["nice", 4.0], ["awful", 1.0]]
    else:
        rows = [["good food", "food,praise"], ["bad room", "complaint"], ["nice", "praise"], ["awful", "complaint"]]
    train = write_csv(tmp_path / "train.csv", ["text", "label"], rows * 4)
    predict = write_csv(tmp_path / "predict.csv", ["text"], [["good food"], ["awful"]])
    dm = ClassificationDataModule(
        tokenizer=str(tiny_bert_dir), train_file=str(train), validation_file=str(train), predict_file=str(predict),
        problem_type=problem_type, batch_size=4,
    )
    model = SequenceClassifier(backbone, lora, labels=dm.labels, problem_type=problem_type, training=LR)
    trainer = make_trainer(tmp_path, max_epochs=3)
    trainer.fit(model, datamodule=dm)
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    records = [r for batch in trainer.predict(model, datamodule=dm) for r in batch]
    assert len(records) == 2
    if problem_type == "regression":
        assert {"val/pearson", "val/spearman", "val/mse"} <= set(metrics)
        assert all(isinstance(r["score"], float) for r in records)
    else:
        assert {"val/accuracy", "val/f1"} <= set(metrics)
        assert set(records[0]["probabilities"]) == {"complaint", "food", "praise"}
        assert all(set(r["labels"]) <= {"complaint", "food", "praise"} for r in records)


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "regression"])
def test_consistency_divergence_of_the_other_heads_holds_the_target_fixed(backbone, lora, problem_type):
    labels = ["a", "b"] if problem_type == "multi_label_classification" else None
    model = SequenceClassifier(backbone, lora, labels=labels, problem_type=problem_type)
    target = torch.tensor([[0.5, -1.0], [2.0, 0.0]], requires_grad=True)
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.5]], requires_grad=True)
    if problem_type == "regression":
        expected = ((logits - target) ** 2).mean()
    else:  # each label a two-class distribution: KL(p_target‖p) per label, averaged
        p, q = torch.sigmoid(target), torch.sigmoid(logits)
        expected = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).mean()
    divergence = model.consistency_divergence(target, logits)
    assert divergence.item() == pytest.approx(expected.item(), rel=1e-5)
    divergence.backward()
    assert target.grad is None and logits.grad.abs().sum() > 0


def test_classifier_needs_labels(backbone, lora):
    with pytest.raises(LightningPeftError, match="model.labels"):
        SequenceClassifier(backbone, lora)


class StopAfterEpoch(pl.Callback):
    """Interrupts a run (as a pre-emption would) after ``epochs`` epochs, without changing its schedule."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def fit_with_checkpoints(backbone, lora, tiny_bert_dir, toy_data, root: Path, stop_after=None, ckpt_path=None):
    pl.seed_everything(1)
    dm = toy_dm(tiny_bert_dir, toy_data)
    model = SequenceClassifier(backbone, lora, labels=dm.labels, training=TrainingConfig(lr=1e-2, warmup_ratio=0.2))
    callbacks = [ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)]
    callbacks += [StopAfterEpoch(stop_after)] if stop_after else []
    trainer = make_trainer(root, max_epochs=4, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


def trainable_state(model: SequenceClassifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_checkpoint_holds_only_trainable_weights(backbone, lora, tiny_bert_dir, toy_data, tmp_path):
    model = fit_with_checkpoints(backbone, lora, tiny_bert_dir, toy_data, tmp_path, stop_after=1)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    # the trainable weights, and the task's own buffer: the softmax temperature (1 until calibrated)
    assert set(checkpoint["state_dict"]) == set(trainable_state(model)) | {"temperature"}
    weights = set(checkpoint["state_dict"]) - {"temperature"}
    assert all("lora_" in k or "classifier.modules_to_save" in k for k in weights)
    assert checkpoint["optimizer_states"] and checkpoint["lr_schedulers"]
    full = sum(v.numel() for v in model.state_dict().values())
    assert sum(v.numel() for v in checkpoint["state_dict"].values()) < full / 5


def test_resume_continues_exactly(backbone, lora, tiny_bert_dir, toy_data, tmp_path):
    full = trainable_state(fit_with_checkpoints(backbone, lora, tiny_bert_dir, toy_data, tmp_path / "a"))
    half = trainable_state(fit_with_checkpoints(backbone, lora, tiny_bert_dir, toy_data, tmp_path / "b", stop_after=2))
    assert not all(torch.allclose(half[k], full[k]) for k in full), "the interrupted run must not be finished already"
    resumed = fit_with_checkpoints(
        backbone, lora, tiny_bert_dir, toy_data, tmp_path / "b", ckpt_path=str(tmp_path / "b" / "last.ckpt")
    )
    resumed_state = trainable_state(resumed)
    assert set(resumed_state) == set(full)
    for name, value in full.items():
        torch.testing.assert_close(resumed_state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_load_from_checkpoint_rebuilds_the_frozen_base(backbone, lora, tiny_bert_dir, toy_data, tmp_path):
    model = fit_with_checkpoints(backbone, lora, tiny_bert_dir, toy_data, tmp_path, stop_after=1)
    restored = SequenceClassifier.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=False)
    batch = {"input_ids": torch.tensor([[2, 10, 11, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    model.eval(), restored.eval()
    torch.testing.assert_close(restored(batch), model(batch))


def test_checkpoint_for_another_label_set_is_refused(backbone, lora, tiny_bert_dir, toy_data, tmp_path):
    fit_with_checkpoints(backbone, lora, tiny_bert_dir, toy_data, tmp_path, stop_after=1)
    other = SequenceClassifier(backbone, LoraConfig(r=2, target_modules=["key"]), labels=["a", "b"])
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    with pytest.raises(LightningPeftError, match="lacks .* trainable weights"):
        other.on_load_checkpoint(checkpoint)


def test_export_loads_with_plain_peft_and_transformers(backbone, lora, tiny_bert_dir, toy_data, tmp_path):
    dm = toy_dm(tiny_bert_dir, toy_data)
    model = SequenceClassifier(backbone, lora, labels=dm.labels, training=LR)
    make_trainer(tmp_path, max_epochs=1).fit(model, datamodule=dm)
    export_dir = model.export(tmp_path / "export", tokenizer=dm.tokenizer) / "adapter"
    model.eval()
    text = "the food was great"
    encoded = dm.tokenizer([text], return_tensors="pt")
    expected = model(dict(encoded))[0].tolist()
    script = f"""
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from peft import AutoPeftModelForSequenceClassification
d = {str(export_dir)!r}
labels = json.load(open(d + "/labels.json"))
labels["id2label"] = {{int(k): v for k, v in labels["id2label"].items()}}
tok = AutoTokenizer.from_pretrained(d)
x = tok([{text!r}], return_tensors="pt")
a = AutoPeftModelForSequenceClassification.from_pretrained(d, **labels).eval()
b = AutoModelForSequenceClassification.from_pretrained(d, **labels).eval()
assert "lightning_peft" not in sys.modules
with torch.no_grad():
    print(json.dumps([a(**x).logits[0].tolist(), b(**x).logits[0].tolist(), b.config.id2label[0]]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    peft_logits, hf_logits, first_label = json.loads(out.stdout.strip().splitlines()[-1])
    assert first_label == "neg"
    torch.testing.assert_close(torch.tensor(peft_logits), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(hf_logits), torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_mixup_mixes_the_head_inputs_and_the_labels(backbone, lora, tiny_bert_dir, toy_data):
    dm = toy_dm(tiny_bert_dir, toy_data)
    dm.setup("fit")
    model = SequenceClassifier(backbone, lora, labels=dm.labels, mixup_alpha=0.4)
    model.train()
    batch = next(iter(dm.train_dataloader()))
    head = model.classification_head()
    seen = []
    handle = head.register_forward_pre_hook(lambda _module, args: seen.append(args[0].detach().clone()))
    torch.manual_seed(5)
    with torch.no_grad():
        plain = model(batch)
        torch.manual_seed(5)
        loss = model.training_loss(batch)
    handle.remove()
    torch.manual_seed(5)  # the same draws as training_loss: λ, then the shuffle
    mix = float(torch.distributions.Beta(0.4, 0.4).sample())
    shuffled = torch.randperm(batch["labels"].shape[0])
    pooled = seen[0]
    # the head's hook saw the unmixed input (it runs before the mixing hook); mix it by hand, as the loss did
    logits = head(mix * pooled + (1 - mix) * pooled[shuffled])
    expected = mix * torch.nn.functional.cross_entropy(logits, batch["labels"]) + (1 - mix) * (
        torch.nn.functional.cross_entropy(logits, batch["labels"][shuffled]))
    assert loss == pytest.approx(float(expected), rel=1e-5)
    assert plain.shape == logits.shape and 0 < mix < 1


def test_mixup_trains_with_packed_rows(backbone, tiny_bert_dir, toy_data, tmp_path):
    pl.seed_everything(0)
    dm = toy_dm(tiny_bert_dir, toy_data)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"])
    model = SequenceClassifier(backbone, lora, labels=dm.labels, mixup_alpha=0.3, training=TrainingConfig(lr=5e-3))
    trainer = make_trainer(tmp_path, max_epochs=8)
    trainer.fit(model, datamodule=dm)
    assert type(model.batching).__name__ == "SequencePacking"
    assert trainer.test(model, datamodule=dm, verbose=False)[0]["test/accuracy"] >= 0.9


def test_mixup_refuses_rdrop_and_negative_alphas(backbone, lora):
    from lightning_peft import Regularization

    with pytest.raises(LightningPeftError, match="mixup does not combine with training.regularization.rdrop_alpha"):
        SequenceClassifier(backbone, lora, labels=["a", "b"], mixup_alpha=0.2,
                           training=TrainingConfig(regularization=Regularization(rdrop_alpha=1.0)))
    with pytest.raises(LightningPeftError, match="mixup_alpha: -1 — the Beta distribution's alpha") as error:
        SequenceClassifier(backbone, lora, labels=["a", "b"], mixup_alpha=-1)
    assert "rdrop" not in str(error.value)  # one cause, the one at hand


def test_augmentation_consistency_trains_the_clean_rows_and_pulls_their_views_to_them(
    backbone, tiny_bert_dir, toy_data, tmp_path
):
    pl.seed_everything(0)
    dm = toy_dm(tiny_bert_dir, toy_data, augmentation={"char_swap": 0.2, "word_dropout": 0.2, "consistency": 1.0})
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"])
    model = SequenceClassifier(backbone, lora, labels=dm.labels, training=TrainingConfig(lr=5e-3))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    model.train()
    with torch.no_grad():
        clean, views = model(batch).chunk(2)
        p_clean, p_views = clean.softmax(-1), views.softmax(-1)
        kl = (p_clean * (p_clean.log() - p_views.log())).sum(-1).mean()
        expected = torch.nn.functional.cross_entropy(clean, batch["labels"][: clean.shape[0]]) + kl
        assert float(model.training_loss(batch)) == pytest.approx(float(expected), rel=1e-5)
    trainer = make_trainer(tmp_path, max_epochs=8)
    trainer.fit(model, datamodule=dm)
    assert type(model.batching).__name__ == "SequencePacking"
    assert trainer.test(model, datamodule=dm, verbose=False)[0]["test/accuracy"] >= 0.9


@pytest.mark.parametrize(("setting", "message"), [
    ({"mixup_alpha": 0.4}, "does not combine with model.init_args.mixup_alpha"),
    ({"training": TrainingConfig(regularization={"rdrop_alpha": 1.0})},
     "does not combine with model.init_args.training.regularization.rdrop_alpha"),
    ({"training": TrainingConfig(sequence_packing=False)},
     "in length-sorted micro-batches of 16 rows (model.init_args.training.sequence_packing is off"),
])
def test_augmentation_consistency_names_what_breaks_its_pairs(setting, message, backbone, lora, tiny_bert_dir,
                                                                toy_data):
    dm = toy_dm(tiny_bert_dir, toy_data, augmentation={"char_swap": 0.2, "consistency": 1.0})
    model = SequenceClassifier(backbone, lora, labels=dm.labels, **setting)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    with pytest.raises(LightningPeftError, match=re.escape(message)) as error:
        model.batch_loss(batch)
    assert str(error.value).count("model.init_args") == 1 + ("micro_batch_size" in str(error.value))
