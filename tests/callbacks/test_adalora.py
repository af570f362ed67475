from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from peft import AdaLoraConfig, PeftModel
from transformers import AutoModelForSequenceClassification

from lightning_peft import ClassificationDataModule, LightningPeftError, SequenceClassifier, TrainingConfig
from lightning_peft.callbacks import AdaLoRAScheduler, LearningRateSearch
from lightning_peft.callbacks.adalora import adalora_model, orthogonal_regulariser, rank_table
from lightning_peft.learning_rate_search import MIN_STEPS

QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


def adalora(**kwargs) -> AdaLoraConfig:
    settings = dict(init_r=6, target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=1000, lora_alpha=8)
    return AdaLoraConfig(target_modules=["query", "value"], **{**settings, **kwargs})


def toy(tiny_bert_dir, toy_data) -> ClassificationDataModule:
    return ClassificationDataModule(
        tokenizer=str(tiny_bert_dir), train_file=str(toy_data["train"]), validation_file=str(toy_data["validation"]),
        batch_size=16, seed=0,
    )


class BudgetLog(Callback):
    """What the scheduler logged after each optimizer step."""

    def __init__(self) -> None:
        self.budgets: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "adalora/budget" in trainer.callback_metrics and len(self.budgets) < trainer.global_step:
            self.budgets.append(trainer.callback_metrics["adalora/budget"].item())


@pytest.mark.parametrize(("accumulate", "precision"), [(1, "32-true"), (2, "32-true"), (2, "bf16-mixed")])
def test_allocates_once_per_optimizer_step_on_peft_s_cubic_schedule(
    accumulate, precision, backbone, tiny_bert_dir, toy_data, monkeypatch
):
    pl.seed_everything(0)
    dm = toy(tiny_bert_dir, toy_data)
    model = SequenceClassifier(backbone, adalora(), labels=dm.labels, training=TrainingConfig(lr=1e-2))
    tuner = adalora_model(model)
    steps = []
    allocate = tuner.update_and_allocate
    monkeypatch.setattr(tuner, "update_and_allocate", lambda step: steps.append(step) or allocate(step))
    log = BudgetLog()
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=16, accumulate_grad_batches=accumulate, precision=precision,
        callbacks=[AdaLoRAScheduler(heatmap=False), log], enable_checkpointing=False, limit_val_batches=0, **QUIET,
    )
    trainer.fit(model, datamodule=dm)
    total = 16 // accumulate
    assert tuner.peft_config["default"].total_step == total  # from trainer.estimated_stepping_batches
    assert steps == list(range(total))  # optimizer steps, 0-based as in peft's loop, never micro-batches
    expected = [tuner.rankallocator.budget_schedule(step)[0] for step in range(total)]
    assert log.budgets == expected
    assert expected[0] == 4 * 6 and expected[-1] == 4 * 2  # 4 adapted matrices: init_r=6 → target_r=2


def test_ranks_end_uneven_and_the_export_reloads_with_plain_peft(backbone, tiny_bert_dir, toy_data, tmp_path):
    pl.seed_everything(0)
    dm = toy(tiny_bert_dir, toy_data)
    model = SequenceClassifier(backbone, adalora(), labels=dm.labels, training=TrainingConfig(lr=1e-2))
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[AdaLoRAScheduler(heatmap=True)], default_root_dir=str(tmp_path),
        enable_checkpointing=False, limit_val_batches=0, **QUIET,
    )
    trainer.fit(model, datamodule=dm)
    pattern = adalora_model(model).peft_config["default"].rank_pattern
    modules, layers, ranks = rank_table(pattern)
    assert layers == [0, 1] and len(modules) == 2
    flat = [r for row in ranks for r in row]
    assert sum(flat) == 4 * 2 and len(set(flat)) > 1  # the target budget, spread unevenly
    assert (tmp_path / "adalora_ranks.png").is_file()

    model.export(tmp_path / "export", tokenizer=dm.tokenizer)
    config = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["orth_reg_weight"] == adalora().orth_reg_weight
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "export" / "adapter").eval()
    batch = next(iter(dm.val_dataloader()))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    model.eval()
    assert torch.allclose(reloaded(**inputs).logits, model(batch), atol=1e-5)


def test_orthogonal_regulariser_is_peft_s_and_lands_in_every_task_loss(backbone, tiny_bert_dir, toy_data):
    pl.seed_everything(0)
    dm = toy(tiny_bert_dir, toy_data)
    model = SequenceClassifier(backbone, adalora(orth_reg_weight=0.5), labels=dm.labels)
    tuner = adalora_model(model)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with_reg = model.model(**inputs, labels=batch["labels"]).loss  # peft adds 0.5 * reg to the HF model's loss
    plain = torch.nn.functional.cross_entropy(model.model(**inputs).logits, batch["labels"])
    assert torch.allclose(with_reg - plain, 0.5 * orthogonal_regulariser(tuner), atol=1e-6)

    trainer = pl.Trainer(
        max_steps=6, callbacks=[AdaLoRAScheduler(heatmap=False)], enable_checkpointing=False, limit_val_batches=0,
        **QUIET,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.callback_metrics["train/adalora_orth_reg"] > 0  # added by the task, not by peft's forward
    assert tuner.peft_config["default"].orth_reg_weight == 0.5 and not model.loss_terms  # restored after fit


class BatchRecorder(Callback):
    """Copies of the training batches, in the order the fit saw them."""

    def __init__(self) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append({key: value.clone() for key, value in batch.items()})


def test_fit_trains_the_weights_and_ranks_of_peft_s_own_adalora_loop(tiny_bert_dir, toy_data):
    """The whole wiring (loss + orthogonal regulariser, optimizer, schedule, clipping, update_and_allocate) against
    the loop peft documents — forward with labels, backward, clip, step, update_and_allocate(step), zero_grad — on
    the same batches without dropout: the same adapter weights and the same final ranks."""
    import copy

    from transformers import get_scheduler

    from lightning_peft import BackboneConfig

    no_dropout = BackboneConfig(pretrained_model_name_or_path=str(tiny_bert_dir),
                                model_config={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    config = adalora(tinit=3, tfinal=4, total_step=16, lora_dropout=0.0, orth_reg_weight=0.5)
    pl.seed_everything(0)
    dm = toy(tiny_bert_dir, toy_data)
    model = SequenceClassifier(no_dropout, config, labels=dm.labels,
                               training=TrainingConfig(lr=2e-2, sequence_packing=False, micro_batch_size=None))
    reference = copy.deepcopy(model.model)
    recorder = BatchRecorder()
    pl.Trainer(max_steps=16, gradient_clip_val=1.0, callbacks=[AdaLoRAScheduler(heatmap=False), recorder],
               enable_checkpointing=False, limit_val_batches=0, **QUIET).fit(model, datamodule=dm)

    trainable = [p for p in reference.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in trainable if p.ndim >= 2]},
                                   {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}], lr=2e-2)
    schedule = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=16)
    reference.train()
    for step, batch in enumerate(recorder.batches):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        reference(**inputs, labels=batch["labels"]).loss.backward()  # peft adds the regulariser here
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        reference.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        schedule.step()

    ours = adalora_model(model).peft_config["default"].rank_pattern
    assert len(recorder.batches) == 16 and ours == reference.peft_config["default"].rank_pattern
    theirs = dict(reference.named_parameters())
    for name, param in model.model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, theirs[name], atol=1e-5, rtol=1e-4, msg=name)


def test_schedule_longer_than_the_fit_is_an_error(backbone, tiny_bert_dir, toy_data):
    dm = toy(tiny_bert_dir, toy_data)
    model = SequenceClassifier(backbone, adalora(tinit=5, tfinal=5), labels=dm.labels)
    trainer = pl.Trainer(max_steps=8, callbacks=[AdaLoRAScheduler()], enable_checkpointing=False, **QUIET)
    with pytest.raises(LightningPeftError, match=r"tinit=5 \+ tfinal=5 >= 8 steps"):
        trainer.fit(model, datamodule=dm)


class StartedSearch(LearningRateSearch):
    started = False

    def on_fit_start(self, trainer, pl_module) -> None:
        self.started = True
        super().on_fit_start(trainer, pl_module)


@pytest.mark.parametrize("lr", [None, "auto"])
@pytest.mark.parametrize("init_r", [2, 1])
def test_nothing_to_prune_is_an_error_before_training(init_r, lr, backbone, tiny_bert_dir, toy_data):
    dm = toy(tiny_bert_dir, toy_data)
    model = SequenceClassifier(backbone, adalora(init_r=init_r, target_r=2), labels=dm.labels,
                               training=TrainingConfig(lr=lr))
    search = StartedSearch(num_training_steps=MIN_STEPS)
    trainer = pl.Trainer(max_steps=8, callbacks=[AdaLoRAScheduler(), search], enable_checkpointing=False, **QUIET)
    with pytest.raises(LightningPeftError, match=rf"init_r={init_r} <= target_r=2 leaves nothing to prune"):
        trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 0 and not search.started, "refused before a range test would train"
    assert adalora_model(model).peft_config["default"].orth_reg_weight == 0.5  # peft's again, as before the fit
    assert not model.loss_terms


class LossTermsAtSearch(LearningRateSearch):
    """The task's loss terms when the range test starts."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self.loss_terms = set(pl_module.loss_terms)
        super().on_fit_start(trainer, pl_module)


def test_learning_rate_range_test_trains_the_orthogonal_regulariser(backbone, tiny_bert_dir, toy_data, tmp_path):
    pl.seed_everything(0)
    dm = toy(tiny_bert_dir, toy_data)
    model = SequenceClassifier(backbone, adalora(), labels=dm.labels, training=TrainingConfig(lr="auto"))
    search = LossTermsAtSearch(num_training_steps=MIN_STEPS, min_lr=1e-3, max_lr=1.0)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=16, callbacks=[AdaLoRAScheduler(heatmap=False), search],
                         enable_checkpointing=False, limit_val_batches=0, default_root_dir=tmp_path, **QUIET)
    trainer.fit(model, datamodule=dm)
    assert search.loss_terms == {"adalora_orth_reg"} and len(search.losses) == MIN_STEPS
    assert adalora_model(model).peft_config["default"].orth_reg_weight == 0.5 and not model.loss_terms


def test_config_without_total_step_takes_the_fit_s_steps_and_fractional_phases(backbone, tiny_bert_dir, toy_data):
    import lightning_peft

    with pytest.raises(ValueError, match="total_step"):
        AdaLoraConfig(init_r=6, target_r=2)  # plain peft insists on total_step
    config = lightning_peft.AdaLoraConfig(init_r=6, target_r=2, tinit=0.25, tfinal=0.5, target_modules=["query"])
    dm = toy(tiny_bert_dir, toy_data)
    model = SequenceClassifier(backbone, config, labels=dm.labels)
    pl.Trainer(max_epochs=1, limit_train_batches=8, callbacks=[AdaLoRAScheduler(heatmap=False)],
               enable_checkpointing=False, limit_val_batches=0, **QUIET).fit(model, datamodule=dm)
    resolved = adalora_model(model).peft_config["default"]
    assert (resolved.total_step, resolved.tinit, resolved.tfinal) == (8, 2, 4)


def test_a_fit_without_the_scheduler_is_refused_before_training(backbone, tiny_bert_dir, toy_data, tmp_path):
    model = SequenceClassifier(backbone, adalora(), labels=toy(tiny_bert_dir, toy_data).labels)
    trainer = pl.Trainer(max_steps=4, enable_checkpointing=False, limit_val_batches=0, default_root_dir=tmp_path,
                         **QUIET)
    with pytest.raises(LightningPeftError, match="AdaLoRA reallocates its ranks through the AdaLoRAScheduler"):
        trainer.fit(model, datamodule=toy(tiny_bert_dir, toy_data))  # else: a fixed-rank LoRA, silently
    assert trainer.global_step == 0


def test_a_scheduler_listed_twice_is_refused(backbone, tiny_bert_dir, toy_data, tmp_path):
    model = SequenceClassifier(backbone, adalora(), labels=toy(tiny_bert_dir, toy_data).labels)
    trainer = pl.Trainer(max_steps=4, callbacks=[AdaLoRAScheduler(), AdaLoRAScheduler()], enable_checkpointing=False,
                         limit_val_batches=0, default_root_dir=tmp_path, **QUIET)
    with pytest.raises(LightningPeftError, match="AdaLoRAScheduler is listed more than once"):
        trainer.fit(model, datamodule=toy(tiny_bert_dir, toy_data))  # each would step the allocation
    assert trainer.global_step == 0


def test_other_peft_methods_are_refused(backbone, lora, tiny_bert_dir, toy_data):
    dm = toy(tiny_bert_dir, toy_data)
    model = SequenceClassifier(backbone, lora, labels=dm.labels)
    trainer = pl.Trainer(max_steps=1, callbacks=[AdaLoRAScheduler()], enable_checkpointing=False, **QUIET)
    with pytest.raises(LightningPeftError, match="not AdaLoRA"):
        trainer.fit(model, datamodule=dm)


def test_usable_from_yaml(tmp_path, tiny_bert_dir, toy_data):
    import yaml

    from lightning_peft.cli import main
    from tests.test_cli import write_config

    config_path = write_config(tmp_path, tiny_bert_dir, toy_data)
    config = yaml.safe_load(config_path.read_text())
    config["trainer"]["log_every_n_steps"] = 1
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning_peft.callbacks.AdaLoRAScheduler", "init_args": {"heatmap": False}}
    ]
    config["model"]["init_args"]["peft"] = {
        "class_path": "peft.AdaLoraConfig",
        "init_args": {"init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 2, "total_step": 5, "target_modules": ["query"]}
        | {"lora_alpha": 8},
    }
    config_path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(config_path)])
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 40  # the end of the fit (in its final phase peft has reset the scores)
    assert checkpoint["rank_pattern"] and set(checkpoint["adalora"]) == {"ipt", "exp_avg_ipt", "exp_avg_unc"}
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "adalora/budget" in metrics and "adalora/target_budget" in metrics
