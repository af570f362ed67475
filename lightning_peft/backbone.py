"""Load a Hugging Face model with the Auto class a task needs and apply any ``peft.PeftConfig`` to it."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, PeftType, TaskType, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from lightning_peft.encoder_decoder import train_new_modules, warm_start_encoder_decoder
from lightning_peft.errors import LightningPeftError
from lightning_peft.quantization import (
    as_quantization_config,
    check_quantization,
    dequantized,
    prepare_for_training,
)


@dataclass
class BackboneConfig:
    """Where the transformer comes from and how it is loaded.

    Args:
        pretrained_model_name_or_path: hub id or local directory with ``config.json`` and weights.
        model_config: with a path, overrides applied to the pretrained config (e.g. ``{hidden_dropout_prob: 0}``);
            without a path, a full config (with ``model_type``) for a randomly initialised model.
        tokenizer: tokenizer hub id or directory; defaults to ``pretrained_model_name_or_path``.
        gradient_checkpointing: trade compute for activation memory (non-reentrant, works with frozen bases);
            ``None``: the task's choice (on for decoder-only chat models, whose activations dominate a step's
            memory; off otherwise).
        dtype: weight dtype to load (``float32``, ``bfloat16``, ``float16`` or ``auto``); ``None`` keeps float32.
        revision: hub revision (branch, tag or commit).
        trust_remote_code: allow custom modelling code from the hub.
        decoder_pretrained_model_name_or_path: seq2seq only: warm-start a ``transformers.EncoderDecoderModel``
            whose encoder is ``pretrained_model_name_or_path`` and whose decoder is loaded from this path (an encoder
            checkpoint such as BERT, given causal self-attention and new, randomly initialised cross-attention).
        gguf_file: a GGUF file inside ``pretrained_model_name_or_path`` to load (de-quantised to float32; its
            tokenizer too, unless ``tokenizer`` is set). Slow on every load: convert it once with
            ``lightning-peft convert-gguf`` and point ``pretrained_model_name_or_path`` at the result instead.
        attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2``, … (``None``: transformers' choice).
        quantization: load the base quantised, for adapters trained on it (QLoRA): any transformers quantisation
            config, e.g. ``transformers.TorchAoConfig`` with ``torchao.quantization.Int8WeightOnlyConfig`` (int8
            weight-only, CPU or GPU) or ``transformers.BitsAndBytesConfig(load_in_4bit=True,
            bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`` (CUDA); the dict ``config.json`` holds is
            accepted too. Needs a PEFT method peft supports on such layers (see :mod:`lightning_peft.quantization`).
        onnx_file: an ONNX file inside ``pretrained_model_name_or_path`` (an export's ``onnx/``: ``model.onnx`` or
            ``model_quantized.onnx``) run by onnxruntime instead of a transformers model; validate, test and predict
            only, with ``peft: null`` (the adapter is merged into it).

    Example::

        BackboneConfig(pretrained_model_name_or_path="bert-base-uncased", gradient_checkpointing=True)
        BackboneConfig("bert-base-uncased", quantization=TorchAoConfig(Int8WeightOnlyConfig()))
    """

    pretrained_model_name_or_path: str | None = None
    model_config: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    gradient_checkpointing: bool | None = None
    dtype: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    decoder_pretrained_model_name_or_path: str | None = None
    gguf_file: str | None = None
    attn_implementation: str | None = None
    quantization: QuantizationConfigMixin | None = None
    onnx_file: str | None = None

    def __post_init__(self) -> None:
        self.quantization = as_quantization_config(self.quantization)  # checkpoints hold it as a dict

    @property
    def is_pretrained(self) -> bool:
        """Whether the frozen weights can be reloaded from ``pretrained_model_name_or_path``."""
        return self.pretrained_model_name_or_path is not None

    @property
    def tokenizer_name_or_path(self) -> str | None:
        """``tokenizer``, else the model's path (its GGUF file's path when it is loaded from one)."""
        return tokenizer_source(self.pretrained_model_name_or_path, self.tokenizer, self.gguf_file)


def tokenizer_source(path: str | None, tokenizer: str | None = None, gguf_file: str | None = None) -> str | None:
    """Where a backbone's tokenizer comes from: ``tokenizer`` if given, else ``path`` (``path/gguf_file`` for a GGUF
    backbone, which :func:`load_tokenizer` reads from the file)."""
    if tokenizer or not path:
        return tokenizer or path
    return str(Path(path) / gguf_file) if gguf_file else path


GGUF_SUFFIX = ".gguf"


def split_gguf_path(path: str | Path) -> tuple[str, str]:
    """``(directory, file name)`` of a ``.gguf`` file path, as ``from_pretrained(directory, gguf_file=name)`` takes
    them."""
    path = Path(path)
    return str(path.parent), path.name


def is_gguf_path(path: str | None) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix)."""
    return bool(path) and str(path).lower().endswith(GGUF_SUFFIX)


def _torch_dtype(name: str | None) -> torch.dtype | str | None:
    if name is None or name == "auto":
        return name
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise LightningPeftError(
            f"backbone.dtype: unknown dtype {name!r}; use float32, bfloat16, float16 or auto"
        )
    return dtype


#: attribute of a loaded model listing its weights that no pretrained checkpoint supplied (a new head, new
#: cross-attention, or everything for a model built from a config): evaluating it before training is refused
NEW_WEIGHTS_ATTRIBUTE = "lightning_peft_new_weights"


def new_weights(model: torch.nn.Module) -> list[str]:
    """Names of ``model``'s weights that were randomly initialised when it was loaded (see :func:`load_backbone`)."""
    return list(getattr(model, NEW_WEIGHTS_ATTRIBUTE, []))


def needs_remote_code(err: Exception) -> bool:
    """Whether transformers refused ``err``'s model or tokenizer because its code lives in the repository."""
    return "trust_remote_code" in str(err)


def _remote_code_error(field: str, path: str) -> LightningPeftError:
    return LightningPeftError(
        f"backbone.{field}: {path} needs custom modelling code from its own files (auto_map in config.json), which "
        "lightning-peft does not run unless you opt in; read that code, and if you trust it set "
        "model.init_args.backbone.trust_remote_code: true in your config or on the command line"
    )


def _load_error(field: str, path: str, what: str, err: Exception) -> LightningPeftError:
    if needs_remote_code(err):
        return _remote_code_error(field, path)
    cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return LightningPeftError(
        f"backbone.{field}: cannot load {path} as {what} ({cause}). Give a local directory with config.json and "
        "weights, or a hub id reachable from this machine."
    )


def load_tokenizer(name_or_path: str | None, field: str = "data.tokenizer", **kwargs: Any) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` (with ``kwargs``) and a clear error naming the config ``field``."""
    if not name_or_path:
        raise LightningPeftError(
            f"{field}: not set; set model.backbone.pretrained_model_name_or_path or backbone.tokenizer"
        )
    if is_gguf_path(name_or_path):  # a tokenizer stored in a GGUF file
        name_or_path, kwargs["gguf_file"] = split_gguf_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        if needs_remote_code(err):
            raise LightningPeftError(
                f"{field}: the tokenizer of {name_or_path!r} needs custom code from its own files (auto_map), which "
                "lightning-peft does not run; give a tokenizer with a tokenizer.json (data.tokenizer) instead"
            ) from err
        raise LightningPeftError(
            f"{field}: cannot load a tokenizer from {name_or_path!r} "
            f"({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        ) from err


def _warm_start(spec: BackboneConfig, overrides: dict[str, Any]) -> tuple[PreTrainedModel, list[str]]:
    tokenizer = load_tokenizer(spec.tokenizer_name_or_path, "model.backbone.tokenizer")
    try:
        return warm_start_encoder_decoder(
            spec.pretrained_model_name_or_path,
            spec.decoder_pretrained_model_name_or_path,
            tokenizer,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            dtype=_torch_dtype(spec.dtype),
            **overrides,
        )
    except (OSError, ValueError) as err:
        paths = f"{spec.pretrained_model_name_or_path!r} and {spec.decoder_pretrained_model_name_or_path!r}"
        field = "pretrained_model_name_or_path / decoder_pretrained_model_name_or_path"
        raise _load_error(field, paths, "the encoder and decoder of an EncoderDecoderModel", err) from err


def _load_transformer(spec: BackboneConfig, auto_class: type, model_kwargs: dict[str, Any]) -> PreTrainedModel:
    overrides = {**spec.model_config, **model_kwargs}
    if not spec.is_pretrained:
        if "model_type" not in spec.model_config:
            raise LightningPeftError(
                "backbone: set pretrained_model_name_or_path (hub id or local directory), "
                "or model_config with a model_type for a randomly initialised model"
            )
        config = AutoConfig.for_model(**overrides)
        attention = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
        model = auto_class.from_config(config, trust_remote_code=spec.trust_remote_code, **attention)
        dtype = _torch_dtype(spec.dtype)
        model = model.to(dtype) if isinstance(dtype, torch.dtype) else model
        setattr(model, NEW_WEIGHTS_ATTRIBUTE, ["every weight (a model built from backbone.model_config)"])
        return model
    try:
        model, info = auto_class.from_pretrained(
            spec.pretrained_model_name_or_path,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            dtype=_torch_dtype(spec.dtype),
            output_loading_info=True,
            **_optional_kwargs(spec),
            **overrides,
        )
    except (OSError, ValueError) as err:
        path = repr(spec.pretrained_model_name_or_path)
        raise _load_error("pretrained_model_name_or_path", path, auto_class.__name__, err) from err
    if spec.gguf_file:
        model = dequantized(model)
    if spec.quantization is not None:
        model = prepare_for_training(model)
    setattr(model, NEW_WEIGHTS_ATTRIBUTE, sorted(info.get("missing_keys", ())))
    return model


def _optional_kwargs(spec: BackboneConfig) -> dict[str, Any]:
    """``from_pretrained`` / ``from_config`` arguments that are passed only when set."""
    options = {"gguf_file": spec.gguf_file, "attn_implementation": spec.attn_implementation,
               "quantization_config": spec.quantization}
    return {key: value for key, value in options.items() if value is not None}


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Distinct short names of the model's linear layers: the values ``target_modules`` usually takes."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    return sorted(names)


def _unmatched_target_modules(model: torch.nn.Module, target_modules: str | list[str] | set[str]) -> list[str]:
    module_names = [name for name, _ in model.named_modules() if name]
    if isinstance(target_modules, str):
        if target_modules == "all-linear" or any(re.fullmatch(target_modules, n) for n in module_names):
            return []
        return [target_modules]
    return [
        key
        for key in sorted(target_modules)
        if not any(name == key or name.endswith("." + key) for name in module_names)
    ]


def _prepare_prompt_learning(model: PreTrainedModel, peft_config: PeftConfig) -> None:
    """Describe a warm-started encoder-decoder's shape to peft, which reads it from top-level config keys that
    ``EncoderDecoderConfig`` lacks; refuse prefix tuning there (peft's prefixes do not fit its decoder caches)."""
    if model.config.model_type != "encoder-decoder":
        return
    if peft_config.peft_type == PeftType.PREFIX_TUNING:
        raise LightningPeftError(
            "peft: PREFIX_TUNING is not supported by peft on a warm-started EncoderDecoderModel (its prefixes do not "
            "fit the decoder's self- and cross-attention caches); use prompt tuning, p-tuning or LoRA, or a native "
            "seq2seq model such as T5"
        )
    encoder, decoder = model.config.encoder, model.config.decoder
    for key, value in (("num_layers", decoder.num_hidden_layers), ("token_dim", encoder.hidden_size),
                       ("num_attention_heads", encoder.num_attention_heads)):
        if getattr(peft_config, key, None) is None:
            setattr(peft_config, key, value)


def _check_prefix_tuning_runs(model: PeftModel) -> None:
    """peft tells only at the first forward that a model cannot take prefixes; find out before training does."""
    device = next(model.parameters()).device
    inputs = {"input_ids": torch.ones(1, 2, dtype=torch.long, device=device)}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.ones(1, 1, dtype=torch.long, device=device)
    try:
        with torch.no_grad():
            model(**inputs)
    except ValueError as err:
        raise LightningPeftError(
            f"peft: PREFIX_TUNING is not supported by peft on {type(model.base_model).__name__} ({err}); "
            "use prompt tuning, p-tuning or LoRA"
        ) from err


def apply_peft(model: PreTrainedModel, peft_config: PeftConfig, task_type: TaskType | None) -> PeftModel:
    """Wrap ``model`` with ``peft_config`` (any PEFT method), checking ``target_modules`` against the model first.

    The task type is filled in from the task when the config leaves it out, so that peft keeps task heads
    (``classifier``, ``score``, …) trainable and saves them with the adapter.
    """
    peft_config = copy.deepcopy(peft_config)
    if getattr(peft_config, "task_type", None) is None and task_type is not None:
        peft_config.task_type = task_type
    if peft_config.is_prompt_learning:
        _prepare_prompt_learning(model, peft_config)
    target_modules = getattr(peft_config, "target_modules", None)
    if target_modules:
        unmatched = _unmatched_target_modules(model, target_modules)
        if unmatched:
            raise LightningPeftError(
                f"peft.target_modules: {unmatched} match no module of {type(model).__name__}. "
                f"Its linear layers are: {linear_layer_names(model)}"
            )
    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as err:
        raise LightningPeftError(
            f"peft: {type(peft_config).__name__} cannot be applied to {type(model).__name__}: {err}"
        ) from err
    if peft_config.peft_type == PeftType.PREFIX_TUNING:
        _check_prefix_tuning_runs(peft_model)
    return peft_model


def load_backbone(
    spec: BackboneConfig,
    auto_class: type,
    peft_config: PeftConfig | None = None,
    task_type: TaskType | None = None,
    **model_kwargs: Any,
) -> PreTrainedModel | PeftModel:
    """Load the transformer described by ``spec`` with ``auto_class`` and wrap it with ``peft_config``.

    Example::

        from peft import LoraConfig
        from transformers import AutoModelForSequenceClassification
        model = load_backbone(
            BackboneConfig("bert-base-uncased"), AutoModelForSequenceClassification,
            LoraConfig(r=8, target_modules=["query", "value"]), num_labels=3,
        )
    """
    check_quantization(spec.quantization, peft_config, spec.is_pretrained)
    if spec.onnx_file:
        return _load_onnx(spec, peft_config)
    if spec.decoder_pretrained_model_name_or_path:
        if spec.quantization is not None:
            raise LightningPeftError(
                "backbone.quantization: a warm-started EncoderDecoderModel (decoder_pretrained_model_name_or_path) is "
                "assembled from two checkpoints and is not loaded quantised; quantise a native seq2seq model (T5) "
                "instead or remove quantization"
            )
        if auto_class is not AutoModelForSeq2SeqLM:
            raise LightningPeftError(
                "backbone.decoder_pretrained_model_name_or_path: only seq2seq tasks (Seq2SeqGenerator) have a decoder; "
                "remove it"
            )
        if not spec.is_pretrained:
            raise LightningPeftError(
                "backbone.decoder_pretrained_model_name_or_path: also set pretrained_model_name_or_path (the encoder)"
            )
        model, new_modules = _warm_start(spec, {**spec.model_config, **model_kwargs})
        setattr(model, NEW_WEIGHTS_ATTRIBUTE, list(new_modules))
        if peft_config is not None:
            peft_config = train_new_modules(peft_config, model, new_modules)
    else:
        model = _load_transformer(spec, auto_class, model_kwargs)
    if spec.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise LightningPeftError(
                f"backbone.gradient_checkpointing: {type(model).__name__} does not support it; set it to false"
            )
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model if peft_config is None else apply_peft(model, peft_config, task_type)


def _load_onnx(spec: BackboneConfig, peft_config: PeftConfig | None) -> torch.nn.Module:
    if peft_config is not None:
        raise LightningPeftError(
            "backbone.onnx_file: an ONNX export has the adapter merged into it; set model.init_args.peft null"
        )
    if not spec.pretrained_model_name_or_path or spec.quantization is not None or spec.gguf_file:
        raise LightningPeftError(
            "backbone.onnx_file: set pretrained_model_name_or_path to the directory holding it (an export's onnx/) "
            "and leave quantization and gguf_file unset"
        )
    from lightning_peft.compressed import OnnxModel

    model = OnnxModel(spec.pretrained_model_name_or_path, spec.onnx_file)
    setattr(model, NEW_WEIGHTS_ATTRIBUTE, [])
    return model


#: names of learnt (or fixed) absolute position tables: BERT-likes, GPT-2, BART / Marian
POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")


def position_limit(model: torch.nn.Module) -> int | None:
    """The most positions ``model``'s absolute position tables cover — an input longer than that fails in the
    embedding lookup — or ``None`` where it has none (relative or rotary positions: T5, Llama)."""
    limits = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and name.rpartition(".")[2] in POSITION_TABLES:
            offset = getattr(module, "offset", 0)  # BART's table starts 2 rows in
            offset += module.padding_idx + 1 if module.padding_idx is not None else 0  # RoBERTa's after padding
            limits.append(module.num_embeddings - offset)
    return min(limits, default=None)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
