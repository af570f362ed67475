from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lightning_peft.callbacks import AdapterExport
from lightning_peft.cli import LightningPeftCLI, main
from lightning_peft.errors import LightningPeftError
from lightning_peft.export import EXPORT_MARKER
from lightning_peft.tasks.base import PeftModule
from tests.test_cli import REPO, write_config


def fit_with_export(tmp_path, tiny_bert_dir, toy_data, on_best=False, monitor="val/accuracy", export=None, **trainer):
    config = write_config(tmp_path, tiny_bert_dir, toy_data)
    data = yaml.safe_load(config.read_text())
    data["checkpoint"].update(monitor=monitor, mode="min" if monitor == "val/loss" else "max")
    data["trainer"].update(trainer)
    data["trainer"]["callbacks"] = [{"class_path": "lightning_peft.callbacks.AdapterExport",
                                     "init_args": {"dirpath": str(tmp_path / "export"), "on_best": on_best,
                                                   **(export or {})}}]
    config.write_text(yaml.safe_dump(data))
    return LightningPeftCLI(args=["fit", "--config", str(config)], save_config_callback=None)


def lora_a(state: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
    key = next(k for k in state if "lora_A" in k)
    return key, state[key]


def test_fit_end_exports_the_best_checkpoint_not_the_last_weights(tmp_path, tiny_bert_dir, toy_data):
    cli = fit_with_export(tmp_path, tiny_bert_dir, toy_data, max_epochs=4, val_check_interval=0.25)
    best = torch.load(tmp_path / "ckpt" / "best.ckpt", weights_only=True)
    assert best["global_step"] < cli.trainer.global_step, "the toy run should peak before its last epoch"
    key, weight = lora_a(best["state_dict"])
    exported = load_file(tmp_path / "export" / "adapter" / "adapter_model.safetensors")
    assert torch.equal(exported[key.removeprefix("model.").replace(".default", "")], weight)
    assert not torch.equal(cli.model.state_dict()[key], weight)  # the model keeps the weights it ended with
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"| val/accuracy | {best['metrics']['val/accuracy']:.4f} |" in card
    assert f"| optimizer steps | {best['global_step']} |" in card and "| checkpoint | best.ckpt |" in card
    assert "| train rows | 320 |" in card  # toy_data's train split
    assert "| optimizer | AdamW(lr=0.01, weight_decay=0.01, betas=" in card and "_instantiator" not in card


def test_on_best_exports_at_each_new_best(tmp_path, tiny_bert_dir, toy_data, monkeypatch):
    exported_steps, exported_losses = [], []
    original = PeftModule.export

    def export(self, *args, **kwargs):
        exported_steps.append(kwargs["training"]["optimizer steps"])
        exported_losses.append(kwargs["metrics"]["val/loss"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PeftModule, "export", export)
    fit_with_export(tmp_path, tiny_bert_dir, toy_data, on_best=True, monitor="val/loss", max_epochs=2,
                    val_check_interval=0.25)
    rows = list(csv.DictReader((tmp_path / "lightning_logs" / "version_0" / "metrics.csv").open()))
    best, improved_at, best_losses = float("inf"), [], []
    for row in rows:
        if row.get("val/loss") and float(row["val/loss"]) < best:
            best = float(row["val/loss"])
            improved_at.append(int(row["step"]) + 1)  # the CSV logs the step before the optimizer's count
            best_losses.append(best)
    assert len(improved_at) >= 2
    final = torch.load(tmp_path / "ckpt" / "best.ckpt", weights_only=True)["global_step"]
    assert exported_steps == [*improved_at, final]  # each new best as it happens, then the best at fit end
    assert exported_losses[:-1] == pytest.approx(best_losses) and exported_losses[-1] == pytest.approx(best)


def test_without_a_checkpoint_the_final_weights_are_exported(tmp_path, tiny_bert_dir, toy_data):
    fit_with_export(tmp_path, tiny_bert_dir, toy_data, max_epochs=1, limit_val_batches=0)
    assert "| checkpoint | none (final weights) |" in (tmp_path / "export" / "README.md").read_text()


def test_the_fit_end_export_may_be_compressed(tmp_path, tiny_bert_dir, toy_data):
    fit_with_export(tmp_path, tiny_bert_dir, toy_data, export={"quantize": "int8"}, max_epochs=1)
    assert {"adapter", "merged", "int8"} <= {p.name for p in (tmp_path / "export").iterdir()}


def test_an_impossible_compression_stops_the_fit_before_training(tmp_path, tiny_bert_dir, toy_data):
    with pytest.raises(LightningPeftError, match="AdapterExport.quantize: 'int4' is not supported"):
        fit_with_export(tmp_path, tiny_bert_dir, toy_data, export={"quantize": "int4"}, max_epochs=1)
    assert not (tmp_path / "ckpt").exists()


def test_cli_export_writes_the_same_layout_with_merged(tmp_path, tiny_bert_dir, toy_data, capsys):
    config = write_config(tmp_path, tiny_bert_dir, toy_data)
    main(["fit", "--config", str(config), "--trainer.max_epochs", "1"])
    main(["export", "--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "best.ckpt"),
          "--export_dir", str(tmp_path / "export"), "--merge", "true"])
    assert f"exported to {tmp_path / 'export'}" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "export").iterdir()} == {"adapter", "merged", "README.md", EXPORT_MARKER}
    merged = json.loads((tmp_path / "export" / "merged" / "config.json").read_text())
    assert merged["id2label"] == {"0": "neg", "1": "pos"}


def test_shipped_preset_loads(tmp_path):
    preset = yaml.safe_load((REPO / "configs" / "callbacks" / "adapter_export.yaml").read_text())
    (callback,) = preset["trainer"]["callbacks+"]  # appended to the callbacks of the configs before it
    assert callback["class_path"] == "lightning_peft.callbacks.AdapterExport"
    assert AdapterExport(**callback["init_args"]).merge


def test_shipped_callback_presets_stack(monkeypatch):
    from lightning_peft.cli import parse_fit_config

    monkeypatch.chdir(REPO)
    presets = ["configs/peft/adalora.yaml", *sorted(str(p.relative_to(REPO)) for p in (REPO / "configs" / "callbacks")
                                                    .glob("*.yaml"))]
    _, config = parse_fit_config(["--config", "configs/quickstart.yaml",
                                  *(arg for preset in presets for arg in ("--config", preset))])
    listed = [callback.class_path.rpartition(".")[2] for callback in config.trainer.callbacks]
    expected = [entry["class_path"].rpartition(".")[2] for preset in presets
                for entry in yaml.safe_load((REPO / preset).read_text())["trainer"]["callbacks+"]]
    assert listed == expected and "AdaLoRAScheduler" in listed and "EarlyStopping" in listed  # none dropped


def test_refuses_a_model_that_is_not_a_peft_module():
    from lightning.pytorch import LightningModule

    with pytest.raises(Exception, match="AdapterExport: the model must be a lightning_peft PeftModule"):
        AdapterExport().setup(None, LightningModule(), "fit")
