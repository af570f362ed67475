"""What the server knows about an exported adapter, read from its directory without loading any weights."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from lightning_peft.compressed import INT8_DIR, ONNX_FILE
from lightning_peft.errors import LightningPeftError
from lightning_peft.export import ADAPTER_DIR, adapter_directory
from lightning_peft.tasks.base import LABELS_FILE
from lightning_peft.tasks.seq2seq import WARM_START_FILE
from lightning_peft.uncertainty import CALIBRATION_FILE

#: peft's task_type of an adapter → the task whose outputs the server gives for it
TASKS = {"SEQ_CLS": "classification", "TOKEN_CLS": "token_classification", "SEQ_2_SEQ_LM": "seq2seq",
         "CAUSAL_LM": "causal_lm"}
GENERATION_TASKS = ("seq2seq", "causal_lm")
#: a compressed export's architecture (config.json) → its task
COMPRESSED_TASKS = {"ForSequenceClassification": "classification", "ForTokenClassification": "token_classification"}
#: the ``method`` of compressed exports (``export --quantize int8`` / ``--onnx``)
INT8_METHOD, ONNX_METHOD = "INT8", "ONNX"
STANDALONE_METHODS = (INT8_METHOD, ONNX_METHOD)
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class AdapterRefused(LightningPeftError):
    """An adapter the server will not load (the message names the file or field and the fix); the serving set is
    unchanged."""


@dataclass(frozen=True)
class ServedAdapter:
    """One exported adapter as the server serves it: where it is, its task, PEFT method, base model (``base``, and
    ``decoder`` for an encoder-decoder warm-started from two checkpoints) and the files that shape its outputs
    (labels, calibrated temperature, generation settings).

    Example::

        adapter = read_adapter("sentiment", "runs/quickstart/export")
        adapter.task, adapter.labels  # ('classification', ['negative', 'positive'])
    """

    name: str
    directory: Path
    task: str
    method: str
    base: str
    decoder: str | None = None
    labels: tuple[str, ...] = ()
    problem_type: str | None = None
    temperature: float = 1.0
    generation: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    #: a compressed export (``int8/``, or an ONNX file of ``onnx/``) is a whole model of its own: its file here
    model_file: str | None = None

    @property
    def standalone(self) -> bool:
        """Whether this is a compressed export, served as its own model rather than an adapter on the shared base."""
        return self.method in STANDALONE_METHODS

    @property
    def base_identity(self) -> str:
        """What two adapters must share to be served together: the base model (and a warm-start's decoder)."""
        return self.base if self.decoder is None else f"{self.base} + decoder {self.decoder}"

    @property
    def head(self) -> tuple[Any, ...]:
        """What must be equal for two adapters to share one model instance: task, PEFT method and head shape (a
        compressed export shares with nothing)."""
        return self.task, self.method, len(self.labels), self.problem_type, self.name if self.standalone else None

    def describe(self) -> dict[str, Any]:
        """The adapter as ``GET /adapters`` lists it."""
        facts: dict[str, Any] = {"name": self.name, "path": str(self.directory), "task": self.task,
                                 "method": self.method, "base": self.base}
        if self.model_file is not None:
            facts["file"] = self.model_file
        if self.decoder is not None:
            facts["decoder"] = self.decoder
        if self.task in ("classification", "token_classification"):
            facts["labels"] = list(self.labels)
        if self.task == "classification":
            facts.update(problem_type=self.problem_type, temperature=self.temperature)
        if self.task in GENERATION_TASKS:
            facts["generation"] = self.generation
        return facts


def resolved_base(name_or_path: str, relative_to: Path | None = None) -> str:
    """A base model's identity for comparison: a local directory by its resolved path (tried as given, then
    relative to ``relative_to``), a hub id as written."""
    for candidate in (Path(name_or_path).expanduser(), *([relative_to / name_or_path] if relative_to else [])):
        if candidate.is_dir():
            return str(candidate.resolve())
    return name_or_path


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterRefused(f"{what}: cannot read {str(path)!r} ({err}); re-export the adapter") from err
    if not isinstance(value, dict):
        raise AdapterRefused(f"{what}: {str(path)!r} holds no JSON object; re-export the adapter")
    return value


def read_adapter(name: str, path: str | Path) -> ServedAdapter:
    """Read and check the export at ``path`` (an export directory or its ``adapter/``) to serve it as ``name``:
    the adapter config, a weights file whose tensors can be read, and the task's files. Raises
    :class:`AdapterRefused` naming the file at fault."""
    if not isinstance(name, str) or not ADAPTER_NAME.match(name):
        raise AdapterRefused(f"name: {name!r} is not a usable adapter name; use 1-64 letters, digits, '_', '-' or "
                             "'.', starting with a letter or digit")
    compressed = read_compressed(name, path)
    if compressed is not None:
        return compressed
    directory = adapter_directory(path)
    config_file = directory / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterRefused(f"path: {str(path)!r} is not an exported adapter (no {ADAPTER_DIR}/adapter_config.json "
                             "or adapter_config.json); give a directory written by `lightning-peft export`")
    config = _read_json(config_file, "path")
    task = TASKS.get(str(config.get("task_type")))
    if task is None:
        raise AdapterRefused(f"path: {str(config_file)!r} has task_type {config.get('task_type')!r}; the server "
                             f"serves {', '.join(TASKS)} adapters")
    base, decoder = config.get("base_model_name_or_path"), None
    if task == "seq2seq" and (directory / WARM_START_FILE).is_file():  # its adapter config names no base
        sources = _read_json(directory / WARM_START_FILE, "path")
        base, decoder = sources.get("encoder"), sources.get("decoder")
    if not isinstance(base, str) or not base:
        raise AdapterRefused(f"path: {str(config_file)!r} names no base model (base_model_name_or_path); "
                             "re-export the adapter with this version of lightning-peft")
    _check_weights(directory)
    labels, problem_type = _head(directory) if task in ("classification", "token_classification") else ((), None)
    generation = {}
    if task in GENERATION_TASKS and (directory / "generation_config.json").is_file():
        generation = _read_json(directory / "generation_config.json", "path")
    return ServedAdapter(name=name, directory=directory, task=task, method=str(config.get("peft_type")),
                         base=resolved_base(base, Path.cwd()),
                         decoder=resolved_base(decoder, Path.cwd()) if decoder else None, labels=labels,
                         problem_type=problem_type,
                         temperature=_temperature(directory), generation=generation)


def read_compressed(name: str, path: str | Path) -> ServedAdapter | None:
    """A compressed export to serve as ``name``: an ``int8/`` directory, an ``onnx/`` directory (its float32
    ``model.onnx``) or one ONNX file in it; ``None`` when ``path`` is none of these."""
    path = Path(path).expanduser().absolute()
    if path.suffix == ".onnx" and path.is_file():
        directory, model_file = path.parent, path.name
    elif (path / ONNX_FILE).is_file():
        directory, model_file = path, ONNX_FILE
    elif path.name == INT8_DIR and (path / "config.json").is_file():
        directory, model_file = path, None
    else:
        return None
    config = _read_json(directory / "config.json", "path")
    architectures = config.get("architectures") or [""]
    task = next((task for suffix, task in COMPRESSED_TASKS.items() if architectures[0].endswith(suffix)), None)
    if task is None:
        raise AdapterRefused(f"path: {str(directory / 'config.json')!r} is a {architectures[0] or 'model'} export; "
                             "compressed exports are served for sequence and token classification")
    labels, problem_type = _head(directory)
    return ServedAdapter(name=name, directory=directory, task=task,
                         method=ONNX_METHOD if model_file else INT8_METHOD, base=str(directory), labels=labels,
                         problem_type=problem_type, temperature=_temperature(directory), model_file=model_file)


def _head(directory: Path) -> tuple[tuple[str, ...], str | None]:
    """A classifier's or tagger's labels and problem type (``labels.json``)."""
    head = _read_json(directory / LABELS_FILE, "path")
    id2label = head.get("id2label") or {}
    labels = tuple(str(id2label[key]) for key in sorted(id2label, key=int))
    if not labels and head.get("problem_type") != "regression":
        raise AdapterRefused(f"path: {str(directory / LABELS_FILE)!r} lists no labels; re-export the adapter")
    return labels, head.get("problem_type")


def _temperature(directory: Path) -> float:
    """The calibrated temperature of ``calibration.json``, or 1."""
    if not (directory / CALIBRATION_FILE).is_file():
        return 1.0
    return float(_read_json(directory / CALIBRATION_FILE, "path").get("temperature", 1.0))


def _check_weights(directory: Path) -> None:
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterRefused(f"path: {str(directory)!r} has no adapter_model.safetensors; re-export the adapter "
                             "(lightning-peft never loads pickled .bin weights)")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            names = handle.keys()  # a safe_open handle is not iterable
            for name in names:
                handle.get_slice(name).get_shape()
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterRefused(f"path: {str(weights)!r} is not a readable safetensors file ({err}); re-export the "
                             "adapter") from err
