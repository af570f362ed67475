"""Compressed exports of a merged encoder model for CPU serving: dynamic int8 through torchao (a transformers
directory that ``from_pretrained`` loads quantised) and ONNX through ``torch.onnx`` and onnxruntime (float32, and
dynamic int8 by onnxruntime's quantiser).

An export directory gains ``int8/`` (``export --quantize int8``) and ``onnx/`` (``export --onnx``: ``model.onnx``,
plus ``model_quantized.onnx`` with ``--quantize int8``), each with the tokenizer, the config and the task's files.
:class:`OnnxModel` runs an ONNX file in place of a transformers model (``backbone.onnx_file``), for
``validate`` / ``test`` / ``predict`` and the server.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel, TorchAoConfig
from transformers.utils import ModelOutput

from lightning_peft.errors import LightningPeftError

INT8_DIR = "int8"
ONNX_DIR = "onnx"
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model_quantized.onnx"  # optimum's name for an onnxruntime-quantised model
#: ``export --quantize`` values
QUANTIZE_CHOICES = ("int8",)
#: encoder inputs an ONNX graph may take, in the order tokenizers produce them
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def check_compression_available(quantize: str | None, onnx: bool, prefix: str = "--") -> None:
    """One error naming the setting (``<prefix>quantize`` / ``<prefix>onnx``) when the value is unknown or its
    backend is not installed."""
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise LightningPeftError(
            f"{prefix}quantize: {quantize!r} is not supported; use one of {list(QUANTIZE_CHOICES)}"
        )
    if quantize and importlib.util.find_spec("torchao") is None:
        raise LightningPeftError(f"{prefix}quantize: needs torchao; pip install 'lightning-peft[quantization]'")
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if onnx and missing:
        raise LightningPeftError(f"{prefix}onnx: needs {', '.join(missing)}; pip install 'lightning-peft[onnx]'")


def int8_config() -> TorchAoConfig:
    """Dynamic int8: int8 weights per output row, activations quantised per token at run time (torchao)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return TorchAoConfig(Int8DynamicActivationInt8WeightConfig())


def save_int8(merged_dir: Path, auto_class: type, target: Path) -> None:
    """Load the merged model in ``merged_dir`` quantised to dynamic int8 (transformers + torchao, which leave
    embeddings and the output head in float) and ``save_pretrained`` it to ``target``."""
    model = auto_class.from_pretrained(merged_dir, quantization_config=int8_config())
    model.save_pretrained(target)


def encoder_inputs(model: PreTrainedModel) -> list[str]:
    """The :data:`ENCODER_INPUTS` ``model.forward`` takes."""
    accepted = inspect.signature(model.forward).parameters
    return [name for name in ENCODER_INPUTS if name in accepted]


def save_onnx(model: PreTrainedModel, target: Path, quantize: bool) -> None:
    """Export ``model`` (float, eval mode) to ``target/model.onnx`` with dynamic batch and sequence axes and its
    ``logits`` as the output; with ``quantize``, also ``target/model_quantized.onnx`` (onnxruntime's dynamic int8)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target.mkdir(parents=True, exist_ok=True)
    names = encoder_inputs(model)
    example = {name: torch.ones(2, 8, dtype=torch.long, device=model.device) for name in names}
    was_training = model.training
    dims = {"batch": torch.export.Dim("batch"), "sequence": torch.export.Dim("sequence")}
    try:
        with _quiet("onnxscript", "torch.onnx", "onnx_ir"), warnings.catch_warnings():
            warnings.simplefilter("ignore", (UserWarning, FutureWarning))  # the exporter's notes on axis names, pytree
            torch.onnx.export(
                model.eval(), (), str(target / ONNX_FILE), kwargs=example, input_names=names, output_names=["logits"],
                dynamic_shapes={name: {0: dims["batch"], 1: dims["sequence"]} for name in names}, dynamo=True,
                external_data=False, verbose=False,
            )
            if quantize:
                quantize_dynamic(target / ONNX_FILE, target / ONNX_INT8_FILE, weight_type=QuantType.QInt8)
    finally:
        model.train(was_training)  # also when the export fails: the caller's model keeps its mode
    model.config.save_pretrained(target)


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Within the block, the named loggers (and the root logger) log errors only: the exporters log every pass."""
    loggers = [logging.getLogger(name) for name in (*names, "root")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@dataclass
class LogitsOutput(ModelOutput):
    """What an :class:`OnnxModel` returns: the graph's ``logits``, as transformers' task models return them."""

    logits: torch.Tensor | None = None


class OnnxModel(torch.nn.Module):
    """An ONNX file of an export, run by onnxruntime where a task calls its transformers model (inference only).

    Example::

        model = OnnxModel("runs/sst2/export/onnx", "model_quantized.onnx")
        logits = model(**tokenizer(["great film"], return_tensors="pt")).logits
    """

    def __init__(self, directory: str | Path, file: str = ONNX_FILE) -> None:
        super().__init__()
        import onnxruntime

        path = Path(directory) / file
        if not path.is_file():
            raise LightningPeftError(
                f"backbone.onnx_file: {str(path)!r} does not exist; an export's onnx/ holds {ONNX_FILE} and, with "
                f"--quantize int8, {ONNX_INT8_FILE}"
            )
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
            raise LightningPeftError(f"backbone.onnx_file: onnxruntime cannot load {str(path)!r} ({err})") from err
        self.input_names = [node.name for node in self.session.get_inputs()]
        self.config = AutoConfig.from_pretrained(directory)

    def forward(self, **inputs: Any) -> LogitsOutput:
        reference = inputs["input_ids"]
        feeds = {}
        for name in self.input_names:
            value = inputs.get(name)
            feeds[name] = (value if value is not None else torch.zeros_like(reference)).cpu().numpy()
        logits = self.session.run(["logits"], feeds)[0]
        return LogitsOutput(logits=torch.from_numpy(logits).to(reference.device))


def loading_notes(auto_class: str, directory: Path, quantize: str | None, onnx: bool) -> str:
    """The model card's paragraphs on loading ``int8/`` and ``onnx/``."""
    notes = []
    if quantize:
        notes.append(
            f"`{INT8_DIR}/`: the merged model with dynamic int8 linear layers (torchao; embeddings and the head stay "
            "float). transformers loads it quantised (needs `torchao`); compile it, or the int8 matmuls run unfused "
            f"and slower than float32:\n\n```python\nfrom transformers import {auto_class}\n"
            f"model = {auto_class}.from_pretrained({str(directory / INT8_DIR)!r}).eval()\n"
            "model.compile(dynamic=True)  # the first batch of each shape compiles\n```\n\n"
            "`lightning-peft predict` runs it (eagerly: less memory, not faster) with "
            f"`--model.init_args.backbone.pretrained_model_name_or_path {directory / INT8_DIR} "
            "--model.init_args.peft null`."
        )
    if onnx:
        files = f"`{ONNX_FILE}` (float32)" + (f" and `{ONNX_INT8_FILE}` (onnxruntime dynamic int8)" if quantize else "")
        notes.append(
            f"`{ONNX_DIR}/`: {files}, inputs {', '.join(ENCODER_INPUTS[:2])} (and token_type_ids where the model "
            "takes them), output `logits`, dynamic batch and sequence axes; the tokenizer beside it:\n\n"
            f"```python\nimport onnxruntime\nfrom transformers import AutoTokenizer\n"
            f"tokenizer = AutoTokenizer.from_pretrained({str(directory / ONNX_DIR)!r})\n"
            f"session = onnxruntime.InferenceSession({str(directory / ONNX_DIR / ONNX_FILE)!r})\n"
            "names = {node.name for node in session.get_inputs()}\n"
            "encoded = tokenizer([\"…\"], return_tensors=\"np\", padding=True)\n"
            "inputs = {k: v for k, v in encoded.items() if k in names}\n"
            "logits = session.run([\"logits\"], inputs)[0]\n```\n\n"
            "`lightning-peft predict` runs it with `--model.init_args.backbone.pretrained_model_name_or_path "
            f"{directory / ONNX_DIR} --model.init_args.backbone.onnx_file {ONNX_FILE} --model.init_args.peft null`."
        )
    return "\n\n".join(notes)
