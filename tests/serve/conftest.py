"""Exports to serve, each with what `lightning-peft predict` wrote for the same checkpoint, and a real server
process on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from lightning_peft.cli import main
from tests.tasks.test_token_classification import write_ner_config


def fit_export_predict(config: Path, directory: Path, *extra: str) -> dict[str, Any]:
    """Fit ``config`` (unless its best checkpoint exists), export its best checkpoint and predict with it."""
    best = directory / "ckpt" / "best.ckpt"
    if not best.is_file():
        main(["fit", "--config", str(config), *extra])
    export, predictions = directory / "export", directory / "predictions.jsonl"
    main(["export", "--config", str(config), "--ckpt_path", str(best), "--export_dir", str(export)])
    main(["predict", "--config", str(config), "--ckpt_path", str(best), "--predictions_path", str(predictions),
          *extra])
    return {"export": export, "predictions": [json.loads(line) for line in predictions.read_text().splitlines()]}


@pytest.fixture(scope="session")
def served(tmp_path_factory, fitted, tiny_bert_dir, toy_data, toy_ner) -> dict[str, dict[str, Any]]:
    """Three adapters on the tiny BERT: two sentiment classifiers (other seeds, other weights) and an NER tagger
    (another head: its own model sharing the base's parameters)."""
    runs = {"sentiment": fit_export_predict(fitted["config"], fitted["config"].parent)}
    other = tmp_path_factory.mktemp("sentiment-b")
    config = fitted["config"].read_text().replace(str(fitted["config"].parent), str(other))
    (other / "config.yaml").write_text(config)
    runs["sentiment_b"] = fit_export_predict(other / "config.yaml", other, "--seed_everything", "11",
                                             "--trainer.max_epochs", "1")
    ner = tmp_path_factory.mktemp("ner")
    runs["ner"] = fit_export_predict(write_ner_config(ner, tiny_bert_dir, toy_ner), ner, "--trainer.max_epochs", "3")
    return runs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``lightning-peft serve`` as a child process on 127.0.0.1 and a small HTTP client for it."""

    def __init__(self, *args: str, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lightning_peft.cli", "serve", "--port", str(self.port), *args],
            env={**os.environ, "HF_HUB_OFFLINE": "1", **({"LIGHTNING_PEFT_API_KEY": api_key} if api_key else {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )

    def wait_ready(self, timeout: float = 180.0) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.process.stdout.read()}")
            try:
                if self.call("GET", "/health")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the server did not become healthy in {timeout} s")

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             raw: bytes | None = None, timeout: float = 120.0) -> tuple[int, Any]:
        """``(status, JSON or text)``; with the server's API key unless ``headers`` are given."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if headers is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read().decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module")
def server(served):
    """One server for the module's tests: the three tiny-BERT adapters, behind an API key (from the environment)."""
    server = Server("--adapters", *(f"{name}={run['export']}" for name, run in served.items()),
                    "--max_inputs", "8", api_key="s3cret")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def served_chat(tmp_path_factory, tiny_llama_dir, toy_chat) -> dict[str, Any]:
    """A LoRA chat adapter on the tiny Llama, fitted for a few steps through the CLI, as a user would."""
    import yaml

    directory = tmp_path_factory.mktemp("chat")
    config = {
        "seed_everything": 5,
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "limit_train_batches": 4, "enable_progress_bar": False,
                    "logger": False, "enable_model_summary": False, "default_root_dir": str(directory)},
        "checkpoint": {"dirpath": str(directory / "ckpt")},
        "model": {"class_path": "lightning_peft.CausalGenerator", "init_args": {
            "backbone": {"pretrained_model_name_or_path": str(tiny_llama_dir)},
            "peft": {"class_path": "peft.LoraConfig", "init_args": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
            "generation": {"max_new_tokens": 12}}},
        "data": {"class_path": "lightning_peft.ChatDataModule", "init_args": {
            **{f"{split}_file": str(toy_chat[split]) for split in ("train", "validation", "test", "predict")},
            "batch_size": 8}},
    }
    path = directory / "chat.yaml"
    path.write_text(yaml.safe_dump(config))
    return fit_export_predict(path, directory)
