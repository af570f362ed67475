from __future__ import annotations

import logging
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from peft import BOFTConfig, IA3Config, LoraConfig, PromptTuningConfig

from lightning_peft import ClassificationDataModule, LightningPeftError, SequenceClassifier, TrainingConfig
from lightning_peft.model_card import task_model_card
from lightning_peft.training import default_learning_rate, explicit_optimizer_lr


@pytest.mark.parametrize(("peft", "lr"), [
    (LoraConfig(r=8), 2e-3),
    (LoraConfig(r=8, use_dora=True), 2e-3),
    (IA3Config(), 2e-2),
    (PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS"), 9e-2),
    (None, 5e-5),  # full fine-tuning: the HF Trainer's rate, not an adapter's
    (BOFTConfig(boft_block_size=4), 1e-3),  # no measured default: torch's AdamW default
], ids=["lora", "dora", "ia3", "prompt_tuning", "full", "unmeasured"])
def test_each_method_has_its_own_default_learning_rate(peft, lr):
    assert default_learning_rate(peft) == lr
    assert TrainingConfig().learning_rate(peft) == lr
    assert TrainingConfig(lr=0.1).learning_rate(peft) == 0.1


@pytest.mark.parametrize(("options", "field"), [
    ({"lr": -1.0}, "training.lr"),
    ({"warmup_ratio": 1.0}, "training.warmup_ratio"),
    ({"micro_batch_size": 0}, "training.micro_batch_size"),
    ({"lr_scheduler_type": "cosine_annealing"}, "training.lr_scheduler_type: 'cosine_annealing' is not a transformers"),
    ({"regularization": {"rdrop_alpha": -1.0}}, "training.regularization.rdrop_alpha"),
])
def test_bad_training_options_name_their_field(options, field):
    with pytest.raises(LightningPeftError, match=f"model.init_args.{field}"):
        TrainingConfig(**options)


def test_the_optimizer_gets_no_learning_rate_of_its_own(backbone, lora):
    assert explicit_optimizer_lr(torch.optim.AdamW) is None
    assert explicit_optimizer_lr(partial(torch.optim.AdamW, weight_decay=0.1)) is None
    assert explicit_optimizer_lr(partial(torch.optim.AdamW, lr=1e-3)) is None  # what LightningCLI fills in
    assert explicit_optimizer_lr(partial(torch.optim.SGD, lr=0.1)) == 0.1
    with pytest.raises(LightningPeftError, match=r"optimizer.init_args.lr: .* model.init_args.training.lr .* 0.1"):
        SequenceClassifier(backbone, lora, labels=["a", "b"], optimizer=partial(torch.optim.SGD, lr=0.1))


@pytest.mark.parametrize(("training", "lr", "source"), [
    (None, 2e-3, "the default for LORA"),
    (TrainingConfig(lr=7e-3), 7e-3, "model.init_args.training.lr"),
], ids=["method-default", "given"])
def test_fit_uses_logs_and_saves_the_learning_rate(backbone, lora, tiny_bert_dir, toy_data, tmp_path, caplog,
                                                   training, lr, source):
    dm = ClassificationDataModule(tokenizer=str(tiny_bert_dir), train_file=str(toy_data["train"]), batch_size=16)
    model = SequenceClassifier(backbone, lora, labels=dm.labels, training=training,
                               optimizer=partial(torch.optim.AdamW, weight_decay=0.05))
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    with caplog.at_level(logging.INFO):
        trainer.fit(model, datamodule=dm)
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == [lr, lr]
    assert trainer.optimizers[0].param_groups[0]["weight_decay"] == 0.05
    assert f"learning rate: {lr:g} ({source}" in caplog.text
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    saved = torch.load(tmp_path / "model.ckpt", weights_only=True)["hyper_parameters"]["training"]
    assert saved["lr"] == lr  # the rate used, also where it was the method's default
    card = task_model_card(model, "", "", {}, {}, {})
    assert card.training["lr"] == lr and card.training["optimizer"].startswith(f"AdamW(lr={lr}, weight_decay=0.05")
