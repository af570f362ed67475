"""Ctrl-C / SIGTERM during ``lightning-peft fit``: a real subprocess stops at a batch boundary, writes ``last.ckpt``,
and ``fit --ckpt_path last`` continues to exactly the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from tests.test_cli import REPO, child_env, write_config

STEPS_BEFORE_SIGNAL = 25  # of 3 epochs x 20 batches: the signal lands inside the second epoch


class PacedTraining(Callback):
    """Slows training down (the tiny model is faster than a signal) and writes the global step after each batch."""

    def __init__(self, step_file: str, seconds: float = 0.05) -> None:
        self.step_file = Path(step_file)
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)
        self.step_file.write_text(str(trainer.global_step))


def paced_config(tmp_path: Path, tiny_bert_dir: Path, toy_data: dict[str, Path], name: str) -> Path:
    """The CLI test config with LoRA dropout (so the random generators matter), 3 epochs and :class:`PacedTraining`."""
    run = tmp_path / name
    run.mkdir()
    config = yaml.safe_load(write_config(run, tiny_bert_dir, toy_data).read_text())
    config["model"]["init_args"]["peft"]["init_args"]["lora_dropout"] = 0.1
    config["trainer"]["max_epochs"] = 3
    config["trainer"]["callbacks"] = [{
        "class_path": "tests.callbacks.test_run_checkpoint.PacedTraining",
        "init_args": {"step_file": str(run / "step.txt")},
    }]
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_fit(config: Path, *args: str) -> subprocess.Popen:
    env = {**child_env(), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "lightning_peft.cli", "fit", "--config", str(config), *args],
                            cwd=config.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def steps_done(step_file: Path) -> int:
    """The step :class:`PacedTraining` last wrote (0 before the first, or while it rewrites the file)."""
    try:
        return int(step_file.read_text())
    except (FileNotFoundError, ValueError):
        return 0


def trained_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bert_dir, toy_data) -> dict[str, torch.Tensor]:
    """The trained weights of the same fit, never interrupted."""
    config = paced_config(tmp_path_factory.mktemp("reference"), tiny_bert_dir, toy_data, "reference")
    fit = start_fit(config)
    _, stderr = fit.communicate(timeout=300)
    assert fit.returncode == 0, stderr[-3000:]
    return trained_weights(config.parent / "ckpt" / "last.ckpt")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stopped_fit_resumes_exactly(tmp_path, tiny_bert_dir, toy_data, reference, signum):
    stopped_config = paced_config(tmp_path, tiny_bert_dir, toy_data, "stopped")
    stopped = start_fit(stopped_config)
    step_file = stopped_config.parent / "step.txt"
    deadline = time.monotonic() + 120
    while steps_done(step_file) < STEPS_BEFORE_SIGNAL:
        assert stopped.poll() is None and time.monotonic() < deadline, stopped.communicate()[1][-3000:]
        time.sleep(0.02)
    signalled_at = time.monotonic()
    os.kill(stopped.pid, signum)
    stdout, stderr = stopped.communicate(timeout=60)
    assert time.monotonic() - signalled_at < 15, "the fit did not stop within seconds"
    assert stopped.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "resume it with --ckpt_path last" in stdout + stderr
    last = stopped_config.parent / "ckpt" / "last.ckpt"
    stopped_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert STEPS_BEFORE_SIGNAL <= stopped_at < 60  # mid-run, not at its end
    if signum == signal.SIGINT:
        return  # Ctrl-C is turned into SIGTERM: from here on the SIGTERM case covers it

    resumed = start_fit(stopped_config, "--ckpt_path", "last")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "not resumable" not in stderr

    got = trained_weights(last)
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 60
    assert reference.keys() == got.keys()
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)
