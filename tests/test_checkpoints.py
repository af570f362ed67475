"""Checkpoints are data: never unpickled, never configuring the run, checked against the config, named best / last.

The behaviour is the CLI's, so most cases run ``lightning-peft`` in a real subprocess."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from lightning_peft.checkpoints import load_checkpoint, resolve_named_checkpoint
from lightning_peft.cli import main
from lightning_peft.errors import LightningPeftError
from tests.test_cli import assert_one_error, run_cli, run_main, write_config


class Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def edited_checkpoint(source: Path, target: Path, **hyper_parameters) -> Path:
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"] = {**checkpoint["hyper_parameters"], **hyper_parameters}
    torch.save(checkpoint, target)
    return target


COMMANDS = {
    "fit": ["fit", "--checkpoint.dirpath", "{tmp}/resumed"],
    "validate": ["validate"],
    "test": ["test"],
    "predict": ["predict", "--predictions_path", "{tmp}/preds.jsonl"],
    "export": ["export", "--export_dir", "{tmp}/export"],
    "explain": ["explain", "--input", "the food was great", "--methods", "[attention_rollout]"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_pickled_payload_never_runs(command, fitted, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": Payload(marker)}, evil)
    torch.load(evil, weights_only=False)  # the payload is real: a plain unpickling runs it
    assert marker.read_text() == "ran"
    marker.unlink()

    subcommand, *extra = COMMANDS[command]
    extra = [arg.format(tmp=tmp_path) for arg in extra]
    result = run_cli(subcommand, "--config", str(fitted["config"]), "--ckpt_path", str(evil), *extra, cwd=tmp_path)
    assert_one_error(result, "never unpickles")
    assert not marker.exists()


def test_a_checkpoint_never_configures_the_backbone_nor_remote_code(fitted, tmp_path):
    """A checkpoint (plain data, safe to load) naming a remote-code model with trust_remote_code: true."""
    marker = tmp_path / "remote-code-ran"
    remote = tmp_path / "remote-model"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({
        "model_type": "remotebert",
        "auto_map": {"AutoConfig": "remote.Config", "AutoModelForSequenceClassification": "remote.Model"},
    }))
    (remote / "remote.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    checkpoint = edited_checkpoint(
        fitted["ckpt"] / "best.ckpt", tmp_path / "swapped.ckpt",
        backbone={"pretrained_model_name_or_path": str(remote), "trust_remote_code": True},
    )
    result = run_cli("test", "--config", str(fitted["config"]), "--ckpt_path", str(checkpoint), cwd=tmp_path)
    assert_one_error(result, "backbone.pretrained_model_name_or_path", str(remote), "config the checkpoint was trained")
    assert not marker.exists()

    # the user's own opt-in is the only way: without it, the model is refused with the option to set
    result = run_cli("fit", "--config", str(fitted["config"]), "--checkpoint.dirpath", str(tmp_path / "c"),
                     "--model.init_args.backbone.pretrained_model_name_or_path", str(remote), cwd=tmp_path)
    assert_one_error(result, "needs custom modelling code", "backbone.trust_remote_code")
    assert not marker.exists()


def test_checkpoints_keep_no_remote_code_permission(tmp_path, tiny_bert_dir, toy_data):
    config = write_config(tmp_path, tiny_bert_dir, toy_data)
    main(["fit", "--config", str(config), "--trainer.max_epochs", "1",
          "--model.init_args.backbone.trust_remote_code", "true"])
    saved = torch.load(tmp_path / "ckpt" / "best.ckpt", weights_only=True)["hyper_parameters"]["backbone"]
    assert saved["trust_remote_code"] is False


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"_class_path": "lightning_peft.TokenClassifier"}, "holds a TokenClassifier but the config's model"),
        ({"peft": {"class_path": "peft.IA3Config", "init_args": {}}}, "PEFT method IA3 but the config"),
    ],
    ids=["task", "peft-method"],
)
def test_a_checkpoint_of_another_model_is_one_error(fitted, tmp_path, capsys, change, fragment):
    checkpoint = edited_checkpoint(fitted["ckpt"] / "best.ckpt", tmp_path / "other.ckpt", **change)
    result = run_main(capsys, "test", "--config", str(fitted["config"]), "--ckpt_path", str(checkpoint))
    assert_one_error(result, fragment)


def test_a_checkpoint_of_another_label_set_is_one_error(fitted, capsys):
    best = str(fitted["ckpt"] / "best.ckpt")
    result = run_main(capsys, "test", "--config", str(fitted["config"]), "--ckpt_path", best,
                      "--data.init_args.labels", "[neg, pos, neutral]")
    assert_one_error(result, "has shape (2, 32) but this model's has (3, 32)", "label set")


def test_best_and_last_name_the_files_of_the_configured_checkpoint_directory(fitted, tmp_path, capsys):
    result = run_cli("test", "--config", str(fitted["config"]), "--ckpt_path", "best", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/accuracy" in result.stdout
    assert resolve_named_checkpoint("last", str(fitted["ckpt"]), "best") == str(fitted["ckpt"] / "last.ckpt")
    assert resolve_named_checkpoint("runs/x.ckpt", None, None) == "runs/x.ckpt"
    with pytest.raises(LightningPeftError, match="sets no checkpoint.dirpath"):
        resolve_named_checkpoint("best", None, "best")
    with pytest.raises(LightningPeftError, match="is a template"):
        resolve_named_checkpoint("best", str(fitted["ckpt"]), "{epoch}-{val_loss:.2f}")
    result = run_main(capsys, "predict", "--config", str(fitted["config"]), "--ckpt_path", "last",
                      "--checkpoint.dirpath", str(tmp_path / "empty"))
    assert_one_error(result, "--ckpt_path last:", "does not exist", "run fit with this config first")


def test_an_untrained_head_is_not_evaluated_unless_asked(fitted, tmp_path, capsys):
    result = run_main(capsys, "test", "--config", str(fitted["config"]))
    assert_one_error(result, "newly initialised, not trained", "--allow_untrained true")
    result = run_main(capsys, "predict", "--config", str(fitted["config"]), "--allow_untrained", "true",
                      "--predictions_path", str(tmp_path / "p.jsonl"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("damage", ["truncated", "not-a-checkpoint", "bare-pickle", "missing", "no-state-dict"])
def test_an_unreadable_checkpoint_is_one_error(fitted, tmp_path, capsys, damage):
    path = tmp_path / "damaged.ckpt"
    if damage == "truncated":
        data = (fitted["ckpt"] / "best.ckpt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "not-a-checkpoint":
        path.write_text("model: not really\n")
    elif damage == "bare-pickle":
        path.write_bytes(pickle.dumps({"state_dict": {}}))
    elif damage == "no-state-dict":
        torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(LightningPeftError, match="--ckpt_path: ") as raised:
        load_checkpoint(path)
    assert "Python objects" not in str(raised.value)  # only a real checkpoint's objects are named as the cause
    result = run_main(capsys, "test", "--config", str(fitted["config"]), "--ckpt_path", str(path))
    assert_one_error(result, "--ckpt_path: ", str(path))


def test_a_checkpoint_written_elsewhere_still_matches_its_model(fitted, tmp_path, capsys):
    """A colleague's checkpoint names their copy of the same model directory: accepted by directory name."""
    backbone = torch.load(fitted["ckpt"] / "best.ckpt", weights_only=True)["hyper_parameters"]["backbone"]
    name = Path(backbone["pretrained_model_name_or_path"]).name
    moved = {**backbone, "pretrained_model_name_or_path": f"/home/colleague/models/{name}"}
    checkpoint = edited_checkpoint(fitted["ckpt"] / "best.ckpt", tmp_path / "moved.ckpt", backbone=moved)
    result = run_main(capsys, "test", "--config", str(fitted["config"]), "--ckpt_path", str(checkpoint))
    assert result.returncode == 0, result.stderr[-3000:]


def test_paths_given_from_python_are_saved_as_strings(tmp_path):
    """A ``pathlib.Path`` (the natural argument from Python) would make the checkpoint unloadable with
    ``weights_only``: resume and load_from_checkpoint would both refuse it."""
    from lightning_peft import BackboneConfig
    from lightning_peft.adapter_checkpoint import plain_hyperparameters

    hparams = plain_hyperparameters({"backbone": BackboneConfig(pretrained_model_name_or_path=tmp_path / "model"),
                                     "output_dir": tmp_path / "out"})
    torch.save({"hyper_parameters": hparams}, tmp_path / "saved.ckpt")
    loaded = torch.load(tmp_path / "saved.ckpt", weights_only=True)["hyper_parameters"]
    assert loaded["backbone"]["pretrained_model_name_or_path"] == str(tmp_path / "model")
    assert loaded["output_dir"] == str(tmp_path / "out")
