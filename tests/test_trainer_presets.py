"""configs/trainer presets under real launches: bf16 on CPU, fp16's CPU fallback, 2-process DDP (gloo) with our
metrics and callbacks, and a two-node torchrun run on this machine."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_peft.cli import LightningPeftCLI
from tests.test_cli import REPO, child_env, run_cli, write_config

PRESETS = REPO / "configs" / "trainer"


def run(*args: str) -> subprocess.CompletedProcess:
    """``lightning-peft ARGS`` in a fresh process from the repository, which must succeed."""
    done = run_cli(*args, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def last_metrics(metrics_csv: Path) -> dict[str, float]:
    rows = list(csv.DictReader(metrics_csv.open()))
    return {key: float(value) for row in rows for key, value in row.items() if value and key.startswith("val/")}


def adalora_export_config(tmp_path: Path, tiny_bert_dir: Path, toy_data: dict) -> Path:
    """The toy classifier with AdaLoRA (schedule from the fit), its scheduler, the adapter export, temperature
    scaling and adversarial training."""
    config_path = write_config(tmp_path, tiny_bert_dir, toy_data)
    config = yaml.safe_load(config_path.read_text())
    config["model"]["init_args"]["peft"] = {
        "class_path": "lightning_peft.AdaLoraConfig",
        "init_args": {"init_r": 6, "target_r": 2, "tinit": 0.1, "tfinal": 0.3, "target_modules": ["query", "value"]},
    }
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning_peft.callbacks.AdaLoRAScheduler", "init_args": {"heatmap": False}},
        {"class_path": "lightning_peft.callbacks.AdapterExport", "init_args": {"dirpath": str(tmp_path / "export")}},
        {"class_path": "lightning_peft.callbacks.TemperatureScaling"},
        {"class_path": "lightning_peft.callbacks.AdversarialTraining"},
    ]
    config_path.write_text(yaml.safe_dump(config))
    return config_path


def test_bf16_preset_trains_on_cpu(tmp_path, tiny_bert_dir, toy_data):
    config = write_config(tmp_path, tiny_bert_dir, toy_data)
    cli = LightningPeftCLI(args=["fit", "--config", str(config), "--config", str(PRESETS / "bf16.yaml"),
                                 "--trainer.max_epochs", "1"], save_config_callback=None)
    assert cli.trainer.precision == "bf16-mixed"
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    assert all(p.dtype == torch.float32 for p in cli.model.parameters())  # autocast: weights stay float32


def test_fp16_on_cpu_falls_back_to_bf16_with_a_warning(tmp_path, tiny_bert_dir, toy_data):
    config = write_config(tmp_path, tiny_bert_dir, toy_data)
    with pytest.warns(UserWarning, match="fp16 is not supported on CPU. Using `precision='bf16-mixed'`"):
        cli = LightningPeftCLI(args=["fit", "--config", str(config), "--trainer.precision", "16-mixed",
                                     "--trainer.max_steps", "1"], save_config_callback=None)
    assert cli.trainer.precision == "bf16-mixed"


def test_ddp_two_processes_train_sync_metrics_and_write_once(tmp_path, tiny_bert_dir, toy_data):
    config = str(adalora_export_config(tmp_path, tiny_bert_dir, toy_data))
    ddp = ["--config", str(PRESETS / "ddp.yaml"), "--trainer.accelerator", "cpu", "--trainer.devices", "2"]
    # gradient checkpointing with a head in modules_to_save: a known DDP trap ("Expected to have finished reduction")
    fit = run("fit", "--config", config, *ddp, "--model.init_args.backbone.gradient_checkpointing", "true")
    assert "MEMBER: 2/2" in fit.stderr + fit.stdout
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]  # rank 0 logs alone
    exported = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
    assert exported["rank_pattern"] and exported["total_step"] == 20  # 320 rows / (16 x 2 processes) x 2 epochs
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no half-written export from another rank
    temperature = torch.load(tmp_path / "ckpt" / "best.ckpt", weights_only=True)["state_dict"]["temperature"]
    calibration = json.loads((tmp_path / "export" / "adapter" / "calibration.json").read_text())
    assert float(temperature) != 1.0  # fitted (every rank fits the same T; rank 0 writes it)
    assert calibration["temperature"] == pytest.approx(float(temperature))

    best = str(tmp_path / "ckpt" / "best.ckpt")
    for name, launch in (("ddp", ddp), ("single", ["--trainer.devices", "1"])):
        run("validate", "--config", config, "--ckpt_path", best, *launch,
            "--trainer.logger.init_args.save_dir", str(tmp_path / name))
    ddp_metrics = last_metrics(tmp_path / "ddp" / "lightning_logs" / "version_0" / "metrics.csv")
    single_metrics = last_metrics(tmp_path / "single" / "lightning_logs" / "version_0" / "metrics.csv")
    for name in ("val/accuracy", "val/f1", "val/ece", "val/nll", "val/brier"):  # states synced: identical
        assert ddp_metrics[name] == pytest.approx(single_metrics[name], abs=1e-6), name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_torchrun_nodes_train_and_write_one_checkpoint(tmp_path, tiny_bert_dir, toy_data):
    config = str(write_config(tmp_path, tiny_bert_dir, toy_data))
    port = str(free_port())
    launches = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
             "-m", "lightning_peft.cli", "fit", "--config", config, "--config", str(PRESETS / "multinode.yaml"),
             "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(), cwd=REPO,
        )
        for rank in (0, 1)
    ]
    outputs = [launch.communicate(timeout=300)[0] for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "MEMBER: 1/2" in outputs[0] + outputs[1] and "MEMBER: 2/2" in outputs[0] + outputs[1]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["best.ckpt", "last.ckpt"]
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 10  # 320 rows split over 2 nodes, batches of 16
    assert "val/accuracy" in checkpoint["metrics"]  # synchronised over both nodes before the checkpoint
