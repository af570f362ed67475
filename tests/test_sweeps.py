"""W&B sweep specs (configs/sweeps/) and the local runner (``lightning-peft sweep``). Every shipped spec runs
`lightning-peft fit` with arguments the CLI accepts: each value of each parameter (both ends of a distribution) is
parsed, so no sweep dies at its first trial."""

from __future__ import annotations

import csv
import random
import time
from pathlib import Path

import pytest
import torch
import yaml

from lightning_peft.adapter_checkpoint import METRICS_KEY
from lightning_peft.cli import main, parse_fit_config
from lightning_peft.errors import LightningPeftError
from lightning_peft.sweep import LocalSweep, SweepSpec, grid, random_suggest, trained_learning_rate
from tests.test_cli import write_config

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
LOGGED_METRICS = {"val/accuracy", "val/f1", "val/loss", "val/bleu"}


def trial_values(spec: dict) -> list:
    if "values" in spec:
        return spec["values"]
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


def fit_arguments(command: list[str]) -> list[str]:
    """The spec's command between ``lightning-peft fit`` and ``${args}``."""
    assert command[:3] == ["${env}", "lightning-peft", "fit"] and command[-1] == "${args}", command
    return command[3:-1]


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_every_sweep_value_is_accepted_by_the_cli(spec_path, monkeypatch):
    monkeypatch.chdir(REPO)  # specs name configs relative to the repository, as `wandb agent` runs there
    spec = yaml.safe_load(spec_path.read_text())
    assert spec["program"] == "lightning-peft" and spec["metric"]["name"] in LOGGED_METRICS
    base = fit_arguments(spec["command"])
    for name, parameter in spec["parameters"].items():
        for value in trial_values(parameter):
            _, config = parse_fit_config([*base, f"--{name}={value}"])
            if name == "config":  # a preset after the task config: its PEFT method wins
                preset = yaml.safe_load(Path(value).read_text())["model"]["init_args"]["peft"]
                assert config.model.init_args.peft.class_path == preset["class_path"], value
                continue
            resolved = config
            for key in name.split("."):
                resolved = resolved[key]
            assert resolved == value, f"{name}={value} parsed as {resolved}"


def test_local_sweep_runs_trials_records_crashes_and_writes_the_best_config(tmp_path, tiny_bert_dir, toy_data,
                                                                              capsys):
    config = write_config(tmp_path, tiny_bert_dir, toy_data)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "program": "lightning-peft", "method": "grid", "metric": {"name": "val/accuracy", "goal": "maximize"},
        "parameters": {"model.init_args.training.warmup_ratio": {"values": [0.0, 1.5]},  # 1.5: refused, exit 2
                       "model.init_args.training.lr": {"value": 0.02}, "trainer.max_epochs": {"value": 1}},
        "command": ["${env}", "lightning-peft", "fit", "--config", str(config), "${args}"],
    }))
    main(["sweep", str(spec_path), "--trials", "5", "--out", str(tmp_path / "sweep")])
    rows = list(csv.DictReader((tmp_path / "sweep" / "results.csv").open()))
    assert [(r["model.init_args.training.warmup_ratio"], r["status"]) for r in rows] == [("0.0", "done"),
                                                                                ("1.5", "failed (exit 2)")]
    assert "warmup_ratio: must be in [0, 1), got 1.5" in rows[1]["error"]
    assert 0.0 <= float(rows[0]["val/accuracy"]) <= 1.0
    assert float(rows[0]["learning_rate"]) == 0.02 and rows[1]["learning_rate"] == ""  # the rate it trained with
    assert (tmp_path / "sweep" / "trial-000" / "checkpoints" / "last.ckpt").is_file()
    best = yaml.safe_load((tmp_path / "sweep" / "best.yaml").read_text())
    assert best["model"]["init_args"]["training"]["warmup_ratio"] == 0.0 and best["trainer"]["max_epochs"] == 1
    parse_fit_config(["--config", str(tmp_path / "sweep" / "best.yaml")])  # a complete, valid fit config
    assert (tmp_path / "sweep" / "metric_vs_parameters.png").stat().st_size > 0

    # a repeated sweep never reads the earlier one's trials: refused, or replaced with --overwrite true
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(spec_path), "--trials", "5", "--out", str(tmp_path / "sweep")])
    assert exit_info.value.code == 2
    assert "holds an earlier sweep (trial-000, trial-001, results.csv" in capsys.readouterr().err
    (tmp_path / "sweep" / "notes.md").write_text("mine")
    earlier = (tmp_path / "sweep" / "trial-000" / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    main(["sweep", str(spec_path), "--trials", "1", "--out", str(tmp_path / "sweep"), "--overwrite", "true"])
    assert sorted(p.name for p in (tmp_path / "sweep").glob("trial-*")) == ["trial-000"]
    assert (tmp_path / "sweep" / "trial-000" / "checkpoints" / "last.ckpt").stat().st_mtime_ns > earlier
    assert (tmp_path / "sweep" / "notes.md").read_text() == "mine"  # not the sweep's to remove


def test_a_trial_reads_only_the_checkpoint_it_wrote(tmp_path, tiny_bert_dir, toy_data):
    config = write_config(tmp_path, tiny_bert_dir, toy_data)
    spec = SweepSpec(tmp_path / "spec.yaml", "grid", "val/accuracy", "maximize", {}, ["--config", str(config)])
    sweep = LocalSweep(spec, trials=1, out=tmp_path / "sweep", parse_config=parse_fit_config)
    planted = sweep.trial_directory(0) / "checkpoints" / "last.ckpt"
    planted.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, METRICS_KEY: {"val/accuracy": 0.99}}, planted)
    assert sweep.read_checkpoint(0, started_at=planted.stat().st_mtime - 1)[METRICS_KEY]["val/accuracy"] == 0.99
    assert sweep.read_checkpoint(0, started_at=time.time() + 1) == {}  # written before the trial started


def test_random_search_draws_within_each_distribution():
    rng = random.Random(0)
    suggest = random_suggest(rng)
    draws = [suggest("lr", {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}) for _ in range(200)]
    assert min(draws) >= 1e-4 and max(draws) <= 1e-2 and sum(d < 1e-3 for d in draws) > 60  # log scale: half below
    assert {suggest("r", {"values": [4, 8]}) for _ in range(50)} == {4, 8}
    assert all(isinstance(suggest("n", {"min": 1, "max": 3}), int) for _ in range(10))


def test_grid_refuses_distributions():
    with pytest.raises(LightningPeftError, match="lr: grid search needs a values list"):
        grid({"lr": {"distribution": "uniform", "min": 0.0, "max": 1.0}})


def test_bayes_search_runs_through_optuna(tmp_path, tiny_bert_dir, toy_data):
    pytest.importorskip("optuna")
    config = write_config(tmp_path, tiny_bert_dir, toy_data)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "program": "lightning-peft", "method": "bayes", "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {"model.init_args.training.lr": {"distribution": "log_uniform_values",
                                                                   "min": 1e-3, "max": 3e-2}},
        "command": ["${env}", "lightning-peft", "fit", "--config", str(config), "--trainer.limit_train_batches", "5",
                    "--trainer.max_epochs", "1", "${args}"],
    }))
    main(["sweep", str(spec_path), "--trials", "2", "--out", str(tmp_path / "sweep")])
    rows = list(csv.DictReader((tmp_path / "sweep" / "results.csv").open()))
    assert [r["status"] for r in rows] == ["done", "done"]
    assert all(1e-3 <= float(r["model.init_args.training.lr"]) <= 3e-2 for r in rows)


@pytest.mark.parametrize(("checkpoint", "rate"), [
    ({"hyper_parameters": {"training": {"lr": 0.003}}}, 0.003),
    ({"hyper_parameters": {"training": {"lr": "auto"}}}, None),  # another module's own record
    ({"hyper_parameters": {"training": None}}, None),
    ({"hyper_parameters": {"lr": 0.1}}, None),
    ({}, None),
])
def test_the_trained_rate_is_read_only_where_a_checkpoint_holds_one(checkpoint, rate):
    assert trained_learning_rate(checkpoint) == rate


@pytest.mark.parametrize(("edit", "message"), [
    (lambda spec: ["not", "a", "mapping"], "must be a YAML mapping"),
    (lambda spec: {**spec, "metric": {"name": "val/accuracy", "goal": "up"}}, "metric.goal must be one of"),
    (lambda spec: {**spec, "method": "hyperband"}, "method: 'hyperband' is not one of grid, random, bayes"),
    (lambda spec: {**spec, "parameters": ["lr"]}, "parameters must map each fit option"),
    (lambda spec: {**spec, "parameters": {"model.init_args.training.lr": 0.01}}, "give {value: …}"),
    (lambda spec: {**spec, "parameters": {"model.init_args.training.lr": {"values": []}}}, "must be a non-empty list"),
    (lambda spec: {**spec, "parameters": {"model.init_args.training.lr": {"min": 0.01}}}, "both min and max"),
    (lambda spec: {**spec, "parameters": {"model.init_args.training.lr": {"min": "1e-2", "max": "1e-3"}}},
     "min must be below max, got 0.01 and 0.001"),  # YAML 1.1 reads 1e-2 as a string: taken as the number
    (lambda spec: {**spec, "parameters": {"model.init_args.training.lr": {
        "distribution": "log_uniform_values", "min": 0, "max": 1}}}, "so min must be > 0"),
    (lambda spec: {**spec, "parameters": {"model.init_args.training.lr": {"min": "low", "max": 1}}},
     "lr.min: must be a number, got 'low'"),
    (lambda spec: {**spec, "parameters": {"trainer.max_epochs": {"distribution": "int_uniform", "min": 1, "max": 2.5}}},
     "int_uniform needs integer min and max"),
    (lambda spec: {**spec, "parameters": {"model.init_args.training.lr": {"distribution": "q_uniform", "min": 0,
                                                                          "max": 1}}}, "is not supported locally"),
    (lambda spec: {**spec, "parameters": {"model.init_args.training.lrr": {"value": 0.01}}},
     "parameters.model.init_args.training.lrr = 0.01: model.init_args.training.lrr: not an option"),
    (lambda spec: {**spec, "parameters": {"trainer.max_epochs": {"values": [1, "two"]}}},
     "parameters.trainer.max_epochs = 'two': trainer.max_epochs: expected int"),
], ids=["list", "goal", "method", "parameters-list", "bare-value", "no-values", "no-max", "min-above-max",
        "log-from-zero", "min-not-a-number", "int-range-of-floats", "distribution", "misspelt-option",
        "value-of-the-wrong-type"])
def test_a_bad_spec_is_one_error_before_any_trial(tmp_path, tiny_bert_dir, toy_data, capsys, edit, message):
    config = write_config(tmp_path, tiny_bert_dir, toy_data)
    spec = {"program": "lightning-peft", "method": "random", "metric": {"name": "val/accuracy"},
            "parameters": {"trainer.max_epochs": {"value": 1}},
            "command": ["${env}", "lightning-peft", "fit", "--config", str(config), "${args}"]}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(edit(spec)))
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(spec_path), "--trials", "1", "--out", str(tmp_path / "sweep")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.startswith(f"error: sweep spec {str(spec_path)!r}: ") and message in err, err
    assert not (tmp_path / "sweep").exists()  # refused before any trial ran
