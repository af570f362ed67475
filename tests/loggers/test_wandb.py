"""configs/logger/wandb.yaml offline (no network): the run holds the resolved config, the metrics and, with
``log_model``, the AdapterExport export as an artifact."""

from __future__ import annotations

import pytest
import yaml

from lightning_peft.cli import LightningPeftCLI
from tests.test_cli import REPO, write_config


def test_offline_run_holds_config_metrics_and_export_artifact(tmp_path, tiny_bert_dir, toy_data, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config_path = write_config(tmp_path, tiny_bert_dir, toy_data)
    config = yaml.safe_load(config_path.read_text())
    config["trainer"]["callbacks"] = [{"class_path": "lightning_peft.callbacks.AdapterExport",
                                       "init_args": {"dirpath": str(tmp_path / "export")}}]
    config_path.write_text(yaml.safe_dump(config))
    cli = LightningPeftCLI(args=[
        "fit", "--config", str(config_path), "--config", str(REPO / "configs" / "logger" / "wandb.yaml"),
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.log_model", "true",
        "--trainer.max_epochs", "1",
    ])
    cli.trainer.logger.experiment.finish()
    # finish() can return before wandb's service process has flushed the run's records (seen in full suite runs on
    # two busy cores); teardown waits for that process to exit, and it writes the file out before it does.
    wandb.teardown()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (records,) = run_dir.glob("run-*.wandb")  # what `wandb sync` would upload: config, history, artifacts
    data = records.read_bytes()
    config_dump = str(toy_data["train"]).encode()  # the resolved CLI config, down to the data files
    assert b"lightning_peft.SequenceClassifier" in data and config_dump in data
    assert b"val/accuracy" in data and b"val/loss" in data  # the metrics
    assert b"export-" in data and b"adapter_model.safetensors" in data  # the export, as a model artifact
