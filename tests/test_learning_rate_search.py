"""``training.lr: auto``: the rule, the loss recording, and fits through the CLI that search, train with the rate
found, keep it in checkpoints and cards, and resume without searching again."""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import Callback
from peft import LoraConfig

from lightning_peft import ClassificationDataModule, LightningPeftError, SequenceClassifier, TrainingConfig
from lightning_peft.learning_rate_search import (
    CURVE_FILE,
    DIVISOR,
    MIN_STEPS,
    PLOT_FILE,
    LearningRateSearch,
    choose_learning_rate,
    has_turned,
    recorded_steps,
    still_falling,
)
from tests.test_cli import REPO, assert_one_error, run_cli, run_main, write_config

QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
LRS = [10 ** (-5 + 5 * i / 99) for i in range(100)]  # 1e-5 … 1, as the default test


def range_test_curve(fall_from: int, lowest_at: int, noise: float = 0.0) -> list[float]:
    """Flat at 0.69 until step ``fall_from``, falling linearly to 0.3 at ``lowest_at``, then diverging."""
    generator = torch.Generator().manual_seed(0)
    losses = []
    for i in range(100):
        if i < fall_from:
            loss = 0.69
        elif i <= lowest_at:
            loss = 0.69 - 0.39 * (i - fall_from) / (lowest_at - fall_from)
        else:
            loss = 0.3 + 0.2 * (i - lowest_at)
        losses.append(loss + noise * float(torch.randn((), generator=generator)))
    return losses


def test_the_rule_takes_a_third_of_the_rate_at_the_minimum():
    chosen = choose_learning_rate(LRS, range_test_curve(fall_from=50, lowest_at=70))
    # a third of the rate at the minimum; the running median moves a sharp V's bottom a few steps earlier
    assert LRS[64] / DIVISOR <= chosen <= LRS[70] / DIVISOR
    assert choose_learning_rate(LRS, range_test_curve(fall_from=20, lowest_at=40)) < chosen  # an earlier one: lower


def test_an_early_fall_to_the_label_prior_does_not_decide():
    # a token classifier's head first learns that most tags are O: a steep fall at low rates (2.2 -> 0.75 around
    # step 40), then the adapter's slower fall to the minimum at step 80 (the shape of a CoNLL-2003 range test)
    losses = [2.2 if i < 35 else 0.75 if i < 45 else 0.75 - 0.3 * (i - 45) / 35 for i in range(81)]
    losses[35:45] = [2.2 - 1.45 * (i + 1) / 10 for i in range(10)]
    losses += [0.45 + 0.3 * i for i in range(1, 20)]
    assert LRS[74] / DIVISOR <= choose_learning_rate(LRS, losses) <= LRS[80] / DIVISOR  # the old rule: LRS[40] / 2


def test_the_rule_ignores_single_batch_spikes_and_stops_at_a_non_finite_loss():
    losses = range_test_curve(fall_from=50, lowest_at=70, noise=0.01)
    losses[30] = 0.05  # one lucky batch long before the real fall
    losses[75:] = [math.nan] * 25  # diverged
    assert LRS[64] / DIVISOR <= choose_learning_rate(LRS, losses) <= LRS[70] / DIVISOR


@pytest.mark.parametrize("losses", [
    [0.69] * 100,  # nothing learnt: a method that needs longer, or too small a range
    [0.69 - 0.0003 * i for i in range(100)],  # a fall within noise (< 10 %)
    range_test_curve(50, 70)[:6],  # too few steps to read anything
])
def test_no_rate_is_read_off_a_curve_that_did_not_fall(losses):
    assert choose_learning_rate(LRS[:len(losses)], losses) is None


def test_the_test_ends_once_the_loss_has_turned_and_reads_as_the_full_curve():
    losses = range_test_curve(fall_from=50, lowest_at=70, noise=0.01)
    turned_at = next(n for n in range(1, 101) if has_turned(losses[:n]))
    assert 70 < turned_at < 80  # past the minimum by a few steps, not the full 100
    assert choose_learning_rate(LRS[:turned_at], losses[:turned_at]) == choose_learning_rate(LRS, losses)


@pytest.mark.parametrize("losses", [
    [0.69] * 100,  # no fall
    range_test_curve(fall_from=50, lowest_at=70)[:70],  # still falling
    [0.69 - 0.0003 * i for i in range(60)] + [0.69] * 40,  # a bump after a fall within noise (< 10 %)
])
def test_a_curve_that_has_not_turned_goes_on(losses):
    assert not has_turned(losses)


def test_a_curve_lowest_at_its_end_is_still_falling():
    falling = [0.69 - 0.003 * i for i in range(60)]
    assert still_falling(falling) and choose_learning_rate(LRS[:60], falling) == LRS[55] / DIVISOR
    assert not still_falling(range_test_curve(fall_from=50, lowest_at=70))
    assert not still_falling([0.69] * 60)  # no fall: no rate, nothing to warn about beyond that


def test_a_non_finite_loss_ends_the_test():
    assert has_turned([0.69] * 10 + [math.nan])


def fake_trainer(lr: float) -> SimpleNamespace:
    """What :func:`recorded_steps` reads of a trainer: the optimizer's rate, the strategy's broadcast, the stop."""
    return SimpleNamespace(optimizers=[SimpleNamespace(param_groups=[{"lr": lr}])], should_stop=False,
                           strategy=SimpleNamespace(broadcast=lambda value: value))


def run_steps(module: torch.nn.Module, windows: list[int]) -> None:
    """Drive ``module`` as Lightning does: each window's batches, the last one inside ``optimizer_step``."""
    batch = 0
    for size in windows:
        for _ in range(size - 1):
            module.training_step(None, batch)
            batch += 1
        module.optimizer_step(0, batch, None, lambda b=batch: module.training_step(None, b))
        batch += 1


class Stepping(torch.nn.Module):
    """Training losses from a list; each optimizer step runs its closure, then multiplies the rate by 10."""

    def __init__(self, values: list[float], trainer: SimpleNamespace) -> None:
        super().__init__()
        self.values, self.trainer = iter(values), trainer

    def training_step(self, batch, batch_idx):
        return {"loss": torch.tensor(next(self.values))}

    def optimizer_step(self, epoch, batch_idx, optimizer, closure):
        closure()
        self.trainer.optimizers[0].param_groups[0]["lr"] *= 10


def test_recorded_steps_pair_each_optimizer_step_s_rate_with_its_batches_mean_loss():
    trainer = fake_trainer(0.1)
    module = Stepping([1.0, 3.0, 2.0, 4.0, 5.0], trainer)
    with recorded_steps(module, trainer) as record:
        run_steps(module, [2, 2, 1])  # an epoch of 5 batches accumulated by 2 ends on a window of one
    assert record.losses == [2.0, 3.0, 5.0]
    assert record.lrs == pytest.approx([0.1, 1.0, 10.0])  # the rate each step applied
    assert "training_step" not in vars(module) and "optimizer_step" not in vars(module)


def test_recorded_steps_stop_the_trainer_when_told():
    trainer = fake_trainer(0.1)
    module = Stepping([1.0, 2.0], trainer)
    with recorded_steps(module, trainer, stop_when=lambda losses: len(losses) == 2) as record:
        run_steps(module, [1])
        assert trainer.should_stop is False
        run_steps(module, [1])
    assert trainer.should_stop is True and len(record.losses) == 2


def test_recorded_steps_keep_the_task_s_own_loss_without_the_terms_added_for_training():
    class Task(Stepping):
        def batch_loss(self, batch):
            return torch.tensor(next(self.values))

        def training_step(self, batch, batch_idx):
            task_loss = self.batch_loss(batch)
            return task_loss + 10.0 + 0 * self.batch_loss(batch)  # a penalty, and a second pass (adversarial)

    trainer = fake_trainer(0.1)
    module = Task([1.0, 9.0, 2.0, 9.0], trainer)
    with recorded_steps(module, trainer) as record:
        run_steps(module, [1, 1])
    assert record.losses == [1.0, 2.0]
    assert not {"training_step", "optimizer_step", "batch_loss"} & set(vars(module))


class BatchingOfTheTest(LearningRateSearch):
    """How the range test computed its batches."""

    def on_fit_start(self, trainer, pl_module) -> None:
        super().on_fit_start(trainer, pl_module)
        self.batching = type(pl_module.batching).__name__


class NoPacking(Callback):
    supports_sequence_packing = False


def test_range_test_batches_as_the_fit_does(backbone, tiny_bert_dir, toy_data, tmp_path):
    dm = ClassificationDataModule(tokenizer=str(tiny_bert_dir), train_file=str(toy_data["train"]), batch_size=8)
    model = SequenceClassifier(backbone, LoraConfig(r=4, target_modules=["query", "value"]), labels=dm.labels,
                               training=TrainingConfig(lr="auto"))
    search = BatchingOfTheTest(num_training_steps=MIN_STEPS, min_lr=1e-3, max_lr=1.0)
    trainer = pl.Trainer(max_steps=6, callbacks=[search, NoPacking()], accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert search.batching == type(model.batching).__name__ == "MicroBatches"


@pytest.mark.parametrize("value", ["fast", -1.0])
def test_lr_is_a_rate_auto_or_null(value):
    with pytest.raises(LightningPeftError, match="training.lr: must be"):
        TrainingConfig(lr=value)
    assert TrainingConfig(lr="auto").searches_learning_rate


def fit_config(tmp_path, tiny_bert_dir, toy_data, steps: int = 60) -> str:
    """The CLI test config with ``lr: auto`` and a range test of ``steps`` over the fit's 4 epochs of 20 batches,
    from 0.01 to 3 (the tiny random-init model moves only at large rates)."""
    import yaml

    path = write_config(tmp_path, tiny_bert_dir, toy_data)
    config = yaml.safe_load(path.read_text())
    config["model"]["init_args"]["training"]["lr"] = "auto"
    search = {"num_training_steps": steps, "min_lr": 0.01, "max_lr": 3.0}
    config["trainer"].update(max_epochs=4, callbacks=[
        {"class_path": "lightning_peft.callbacks.LearningRateSearch", "init_args": search}])
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_fit_searches_trains_with_the_rate_and_keeps_it(tmp_path, tiny_bert_dir, toy_data, capsys, caplog):
    config = fit_config(tmp_path, tiny_bert_dir, toy_data)
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match="cost up to 75% of this fit's 80"):
        result = run_main(capsys, "fit", "--config", config, "--trainer.min_epochs", "4")  # the fit's, not the test's
    assert result.returncode == 0, result.stderr[-3000:]
    curve = json.loads((tmp_path / "ckpt" / CURVE_FILE).read_text())
    assert (tmp_path / "ckpt" / PLOT_FILE).stat().st_size > 0
    assert len(curve["lrs"]) == len(curve["losses"]) < 60  # stopped once the loss had turned
    assert f"range test: ended after {len(curve['losses'])} steps, once the loss had turned" in caplog.text
    found = curve["lr"]
    assert found == choose_learning_rate(curve["lrs"], curve["losses"])
    assert f"learning rate: {found:g} (training.lr: auto, found by a learning-rate range test" in caplog.text

    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["hyper_parameters"]["training"]["lr"] == last["found_learning_rate"] == pytest.approx(found)
    schedule = last["lr_schedulers"][0]
    assert schedule["base_lrs"] == [pytest.approx(found)] * len(schedule["base_lrs"])  # the schedule peaks there

    exported = run_main(capsys, "export", "--config", config, "--ckpt_path", str(tmp_path / "ckpt" / "best.ckpt"),
                        "--export_dir", str(tmp_path / "export"), "--model.init_args.training.lr", "0.05")
    assert exported.returncode == 0, exported.stderr[-3000:]
    card = (tmp_path / "export" / "README.md").read_text()  # the rate trained with, not the export config's
    assert f"| lr | {found:g} (training.lr: auto, found by a learning-rate range test" in card

    (tmp_path / "ckpt" / CURVE_FILE).unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        resumed = run_main(capsys, "fit", "--config", config, "--trainer.max_epochs", "5",
                           "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (tmp_path / "ckpt" / CURVE_FILE).exists()  # no second search
    assert f"learning rate: {found:g} (training.lr: auto" in caplog.text


def test_without_stop_once_turned_the_test_runs_its_whole_range(tmp_path, tiny_bert_dir, toy_data, capsys):
    config = fit_config(tmp_path, tiny_bert_dir, toy_data)
    result = run_main(capsys, "fit", "--config", config, "--trainer.max_epochs", "3",
                      "--trainer.callbacks.init_args.stop_once_turned", "false")
    assert result.returncode == 0, result.stderr[-3000:]
    curve = json.loads((tmp_path / "ckpt" / CURVE_FILE).read_text())
    assert len(curve["losses"]) == 60  # the fit test above stops this same curve early


def test_the_test_takes_every_optimizer_step_past_the_fit_s_epochs_without_validating(tmp_path, tiny_bert_dir,
                                                                                       toy_data, capsys, monkeypatch):
    validated_in_test = []
    validation_step = SequenceClassifier.validation_step

    def validation_step_seen(self, *args, **kwargs):
        validated_in_test.append(any(type(c).__name__ == "_LRCallback" for c in self.trainer.callbacks))
        return validation_step(self, *args, **kwargs)

    monkeypatch.setattr(SequenceClassifier, "validation_step", validation_step_seen)
    config = fit_config(tmp_path, tiny_bert_dir, toy_data, steps=30)
    # one epoch of 20 batches = 7 optimizer steps (the last of 2 batches); the test needs 30, over 5 epochs
    result = run_main(capsys, "fit", "--config", config, "--trainer.max_epochs", "1",
                      "--trainer.accumulate_grad_batches", "3", "--trainer.callbacks.init_args.stop_once_turned",
                      "false", "--trainer.callbacks.init_args.early_stop_threshold", "null")
    assert result.returncode == 0, result.stderr[-3000:]
    curve = json.loads((tmp_path / "ckpt" / CURVE_FILE).read_text())
    assert len(curve["losses"]) == len(curve["lrs"]) == 30
    ratios = [b / a for a, b in itertools.pairwise(curve["lrs"])]
    # no step left out: one factor between steps (Lightning's schedule moves two between its first two) up to 3.0
    assert ratios[1:] == pytest.approx([ratios[1]] * 28) and curve["lrs"][-1] == pytest.approx(3.0)
    assert validated_in_test and not any(validated_in_test)  # the fit validated, the range test did not
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 7  # the fit's one epoch


def test_a_curve_without_a_fall_keeps_the_method_default_and_says_so(tmp_path, tiny_bert_dir, toy_data, capsys,
                                                                     caplog):
    config = fit_config(tmp_path, tiny_bert_dir, toy_data, steps=MIN_STEPS)
    too_small_to_move = ["--trainer.callbacks.init_args.min_lr", "1e-9", "--trainer.callbacks.init_args.max_lr", "1e-8"]
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match=f"not fall by 10% over the {MIN_STEPS}-step"):
        result = run_main(capsys, "fit", "--config", config, "--trainer.max_epochs", "1", *too_small_to_move)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "learning rate: 0.002 (the default for LORA" in caplog.text
    assert json.loads((tmp_path / "ckpt" / CURVE_FILE).read_text())["lr"] is None  # the curve, to see why
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["found_learning_rate"] is None



class RecordRate(Callback):
    """Writes each process's peak learning rate (its schedule's base rate) to ``rate-<rank>.txt`` in ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_start(self, trainer, pl_module) -> None:
        rate = trainer.lr_scheduler_configs[0].scheduler.base_lrs[0]
        (Path(self.directory) / f"rate-{trainer.global_rank}.txt").write_text(repr(rate))


@pytest.mark.parametrize(("settings", "message"), [
    ({"num_training_steps": MIN_STEPS - 1}, f"num_training_steps: a rate is read from {MIN_STEPS} steps or more"),
    ({"min_lr": 1.0, "max_lr": 1e-3}, "0 < min_lr < max_lr; got 1 and 0.001"),
    ({"min_lr": 0.0}, "0 < min_lr < max_lr; got 0 and 1"),
    ({"max_lr": -1.0}, "0 < min_lr < max_lr; got 1e-05 and -1"),
])
def test_settings_no_rate_can_come_from_are_refused(settings, message):
    with pytest.raises(LightningPeftError, match=f"LearningRateSearch.*{re.escape(message)}"):
        LearningRateSearch(**settings)


def test_a_bad_setting_is_one_error_line_from_the_cli(tmp_path, tiny_bert_dir, toy_data, capsys):
    config = fit_config(tmp_path, tiny_bert_dir, toy_data)
    result = run_main(capsys, "fit", "--config", config, "--trainer.callbacks.init_args.num_training_steps", "5")
    assert_one_error(result, "LearningRateSearch.num_training_steps", "got 5")


def test_a_listed_search_without_lr_auto_says_it_does_nothing(tmp_path, tiny_bert_dir, toy_data, capsys):
    config = fit_config(tmp_path, tiny_bert_dir, toy_data)
    with pytest.warns(UserWarning, match="no search, since model.init_args.training.lr is not auto"):
        result = run_main(capsys, "fit", "--config", config, "--model.init_args.training.lr", "0.01",
                          "--trainer.max_epochs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "ckpt" / CURVE_FILE).exists()


def test_every_ddp_process_trains_with_the_rate_process_zero_found(tmp_path, tiny_bert_dir, toy_data):
    import yaml

    config_path = fit_config(tmp_path, tiny_bert_dir, toy_data, steps=60)
    config = yaml.safe_load(Path(config_path).read_text())
    config["trainer"]["callbacks"].append({"class_path": "tests.test_learning_rate_search.RecordRate",
                                           "init_args": {"directory": str(tmp_path)}})
    Path(config_path).write_text(yaml.safe_dump(config))
    fit = run_cli("fit", "--config", config_path, "--config", str(REPO / "configs" / "trainer" / "ddp.yaml"),
                  "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_epochs", "7", cwd=REPO)
    assert fit.returncode == 0, fit.stderr[-3000:]
    curve = json.loads((tmp_path / "ckpt" / CURVE_FILE).read_text())
    assert len(curve["losses"]) < 60  # process 0's turn ended the test on both (a mismatch would hang)
    rates = [float((tmp_path / f"rate-{rank}.txt").read_text()) for rank in (0, 1)]
    assert curve["lr"] is not None and rates == [curve["lr"], curve["lr"]]


def ner_task(request, lr):
    from lightning_peft import TokenClassificationDataModule, TokenClassifier

    backbone, files = request.getfixturevalue("tiny_bert_dir"), request.getfixturevalue("toy_ner")
    dm = TokenClassificationDataModule(tokenizer=str(backbone), train_file=str(files["train"]), batch_size=16, seed=0)
    lora = LoraConfig(r=4, target_modules=["query", "value"])
    return TokenClassifier({"pretrained_model_name_or_path": str(backbone)}, lora, labels=dm.labels,
                           training={"lr": lr}), dm


def seq2seq_task(request, lr):
    from lightning_peft import Seq2SeqDataModule, Seq2SeqGenerator

    backbone, files = request.getfixturevalue("tiny_t5_dir"), request.getfixturevalue("toy_pairs")
    dm = Seq2SeqDataModule(tokenizer=str(backbone), train_file=str(files["train"]), batch_size=16, seed=0)
    lora = LoraConfig(r=4, target_modules=["q", "v"])
    return Seq2SeqGenerator({"pretrained_model_name_or_path": str(backbone)}, lora, training={"lr": lr}), dm


def chat_task(request, lr):
    from lightning_peft import CausalGenerator, ChatDataModule

    backbone, files = request.getfixturevalue("tiny_llama_dir"), request.getfixturevalue("toy_chat")
    dm = ChatDataModule(tokenizer=str(backbone), train_file=str(files["train"]), batch_size=8, seed=0)
    return CausalGenerator({"pretrained_model_name_or_path": str(backbone)},
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), training={"lr": lr}), dm


@pytest.mark.parametrize("build", [ner_task, seq2seq_task, chat_task], ids=["ner", "seq2seq", "chat"])
def test_every_task_searches(build, request, tmp_path):
    model, dm = build(request, "auto")
    search = LearningRateSearch(num_training_steps=MIN_STEPS, min_lr=1e-3, max_lr=10.0)
    trainer = pl.Trainer(max_epochs=6, limit_val_batches=0, callbacks=[search], default_root_dir=tmp_path, **QUIET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cost warning; a curve without a fall
        trainer.fit(model, datamodule=dm)
    assert search.output_dir(trainer) == tmp_path / "checkpoints"  # beside the checkpoints
    curve = json.loads((tmp_path / "checkpoints" / CURVE_FILE).read_text())
    assert 6 <= len(curve["losses"]) == len(curve["lrs"]) <= MIN_STEPS  # fewer: Lightning stopped a diverging loss
    assert all(math.isfinite(loss) for loss in curve["losses"][:6])
    expected = curve["lr"] if curve["lr"] is not None else build(request, None)[0].learning_rate
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs[0] == pytest.approx(expected)
