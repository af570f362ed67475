"""Quantised bases: checking a transformers quantisation config against the rest of the setup, preparing the loaded
model for k-bit training, and turning a quantised model back into a full-precision one for merging.

``backbone.quantization`` takes any ``transformers`` quantisation config (``TorchAoConfig``: int8 weight-only on CPU
or GPU; ``BitsAndBytesConfig``: 4-bit NF4, QLoRA, on CUDA). Checkpoints keep it as the plain dict transformers writes
in ``config.json`` (:func:`plain_quantization`), which :func:`as_quantization_config` turns back into the object.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import warnings
from typing import Any

import torch
from jsonargparse import ArgumentError, ArgumentParser, set_parsing_settings
from peft import PeftConfig, PeftModel, prepare_model_for_kbit_training
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.integrations import dequantize_module_weight
from transformers import PreTrainedModel
from transformers.quantizers import AutoQuantizationConfig
from transformers.utils.quantization_config import QuantizationConfigMixin

from lightning_peft.errors import LightningPeftError

FIELD = "backbone.quantization"

# transformers' quantisation configs are dataclasses, which jsonargparse builds only as the class a type hint names;
# let ``backbone.quantization`` take any of them by class_path
set_parsing_settings(subclasses_enabled=[QuantizationConfigMixin])

#: peft's quantised-layer support lives in one module per backend inside each tuner's package
#: (``peft/tuners/lora/torchao.py``, ``peft/tuners/ia3/bnb.py``, …)
BACKEND_MODULES = {"torchao": "torchao", "bitsandbytes": "bnb"}


def as_quantization_config(value: QuantizationConfigMixin | dict[str, Any] | None) -> QuantizationConfigMixin | None:
    """``value`` as a transformers quantisation config: a dict is the form ``config.json`` and checkpoints hold.

    Example::

        as_quantization_config({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})
    """
    if value is None or isinstance(value, QuantizationConfigMixin):
        return value
    if isinstance(value, dict) and "class_path" in value:  # LightningCLI's hyper-parameters keep the YAML form
        parser = ArgumentParser(exit_on_error=False)
        parser.add_argument("--quantization", type=QuantizationConfigMixin)
        try:
            return parser.instantiate_classes(parser.parse_object({"quantization": value})).quantization
        except (ArgumentError, ValueError, TypeError, ImportError) as err:
            raise LightningPeftError(f"{FIELD}: cannot build {value.get('class_path')} ({err})") from err
    if not isinstance(value, dict) or "quant_method" not in value:
        raise LightningPeftError(
            f"{FIELD}: expected a transformers quantisation config (class_path: transformers.TorchAoConfig or "
            f"transformers.BitsAndBytesConfig with init_args), got {value!r}"
        )
    try:
        return AutoQuantizationConfig.from_dict(dict(value))
    except (ValueError, TypeError, ImportError) as err:
        raise LightningPeftError(f"{FIELD}: cannot build a quantisation config from {value!r} ({err})") from err


def plain_quantization(config: QuantizationConfigMixin | None) -> dict[str, Any] | None:
    """The config as plain JSON data (what transformers writes in ``config.json``), for checkpoints and cards."""
    return None if config is None else json.loads(json.dumps(config.to_dict(), default=str))


def quant_method(config: QuantizationConfigMixin) -> str:
    """``torchao``, ``bitsandbytes``, … as transformers names the backend."""
    method = config.quant_method
    return str(getattr(method, "value", method))


def describe(config: QuantizationConfigMixin | None) -> str:
    """One phrase for logs and model cards, e.g. ``torchao Int8WeightOnlyConfig`` or ``bitsandbytes 4-bit nf4``."""
    if config is None:
        return "none"
    method = quant_method(config)
    if method == "torchao":
        return f"torchao {type(config.quant_type).__name__}"
    if method == "bitsandbytes":
        if getattr(config, "load_in_4bit", False):
            double = " double-quantised" if config.bnb_4bit_use_double_quant else ""
            return f"bitsandbytes 4-bit {config.bnb_4bit_quant_type}{double}"
        return "bitsandbytes 8-bit"
    return method


def quantization_note(config: QuantizationConfigMixin | None) -> str:
    """What a model card says about a quantised base (empty for a full-precision one)."""
    if config is None:
        return ""
    return (
        f"{describe(config)} (backbone.quantization), applied as the base was loaded: the adapter was trained "
        f"against those weights. To reproduce the trained model exactly, load the base with quantization_config="
        f"{type(config).__name__}.from_dict({json.dumps(plain_quantization(config))}); a full-precision base gives "
        "nearly the same outputs"
    )


#: peft's tuners that replace layers, as their packages are named; the ones with a module for a backend list it
LAYER_TUNERS = ("lora", "adalora", "ia3", "vera", "oft", "boft", "randlora", "road", "hira")


def _has_backend_layers(tuner: str, method: str) -> bool:
    """Whether peft's tuner package ``tuner`` has layers for the quantisation backend ``method``."""
    module = BACKEND_MODULES.get(method)
    return module is not None and importlib.util.find_spec(f"peft.tuners.{tuner}.{module}") is not None


def _supports_backend(peft_config: PeftConfig, method: str) -> bool:
    if peft_config.is_prompt_learning:  # virtual tokens: no layer of the base is replaced
        return True
    return _has_backend_layers(peft_config.peft_type.value.lower(), method)


def check_quantization(
    config: QuantizationConfigMixin | None, peft_config: PeftConfig | None, is_pretrained: bool
) -> None:
    """Refuse, before anything is loaded, combinations that cannot train: no PEFT method (a quantised base is
    frozen), a method peft cannot put on the backend's layers, 4-bit bitsandbytes without CUDA, a missing backend."""
    if config is None:
        return
    method, what = quant_method(config), describe(config)
    if not is_pretrained:
        raise LightningPeftError(
            f"{FIELD}: {what} quantises weights as they are loaded from pretrained_model_name_or_path, and this "
            "backbone is built from model_config; save that model with save_pretrained and point "
            "pretrained_model_name_or_path at it, or remove quantization"
        )
    if peft_config is None:
        raise LightningPeftError(
            f"{FIELD}: {what} gives a frozen base, and model.init_args.peft is null (full fine-tuning); "
            "set a PEFT method (e.g. --config configs/peft/lora.yaml) or remove quantization"
        )
    if method == "bitsandbytes":
        if not torch.cuda.is_available():
            raise LightningPeftError(
                f"{FIELD}: {what} runs on CUDA only and this machine has no CUDA device; use "
                "transformers.TorchAoConfig with torchao.quantization.Int8WeightOnlyConfig on CPU, or train on a GPU"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise LightningPeftError(f"{FIELD}: {what} needs bitsandbytes: pip install bitsandbytes")
    if method == "torchao" and importlib.util.find_spec("torchao") is None:
        raise LightningPeftError(f"{FIELD}: {what} needs torchao: pip install 'lightning-peft[quantization]'")
    if not _supports_backend(peft_config, method):
        supported = [tuner for tuner in LAYER_TUNERS if _has_backend_layers(tuner, method)]
        raise LightningPeftError(
            f"model.init_args.peft: peft cannot put {peft_config.peft_type.value} on {what} layers "
            f"({FIELD}); on {method} it supports {', '.join(supported) or 'no layer method'} and prompt, prefix and "
            "p-tuning. Choose one of those or remove quantization"
        )
    if method == "torchao" and getattr(peft_config, "lora_bias", False):
        raise LightningPeftError(f"model.init_args.peft.lora_bias: peft's LoRA on {what} layers has no bias; set false")


def is_fsdp(strategy: Any) -> bool:
    """Whether a trainer's ``strategy`` (an object, a name or a ``class_path`` dict) is FSDP."""
    name = strategy.get("class_path", "") if isinstance(strategy, dict) else strategy
    name = name if isinstance(name, str) else type(name).__name__
    return "fsdp" in name.lower()


def check_strategy(config: QuantizationConfigMixin | dict[str, Any] | None, strategy: Any) -> None:
    """FSDP shards flat parameters, which quantised weights (packed 4-bit, int8 tensor subclasses) cannot be split
    into: refuse the combination naming both settings."""
    if config is None or not is_fsdp(strategy):
        return
    what = describe(as_quantization_config(config))
    raise LightningPeftError(
        f"trainer.strategy: FSDP cannot shard the {what} weights of {FIELD}; use DDP "
        "(configs/trainer/ddp.yaml: each GPU holds the small quantised base) or remove quantization"
    )


def prepare_for_training(model: PreTrainedModel) -> PreTrainedModel:
    """peft's ``prepare_model_for_kbit_training``: norms and other non-quantised float16/bfloat16 weights in
    float32, the base frozen. Activation checkpointing stays ``backbone.gradient_checkpointing``'s job."""
    with warnings.catch_warnings():  # peft asks transformers a deprecated question (is_gradient_checkpointing)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether ``model`` (a PEFT or HF model) holds quantised weights."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return getattr(base, "hf_quantizer", None) is not None


def _full_precision_linear(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Linear:
    weight = dequantize_module_weight(module).detach().to(dtype)
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device=weight.device,
                             dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias.detach().to(dtype))
    return linear


def _has_quantized_weight(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return weight is not None and (
        type(weight).__module__.startswith("torchao.") or type(weight).__name__ in ("Params4bit", "Int8Params")
    )


def dequantize_base(model: PreTrainedModel, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """``model`` (not wrapped by peft) with every quantised linear layer replaced by a ``torch.nn.Linear`` holding
    its de-quantised weight in ``dtype``, and without transformers' quantisation flags: the float model the
    quantised one computes with."""
    for name, module in list(model.named_modules()):
        if name and _has_quantized_weight(module):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, _full_precision_linear(module, dtype))
    return dequantized(model)


def dequantized(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` without transformers' quantisation flags, once no weight is quantised any more.

    transformers flags a model as quantised (``hf_quantizer``, ``config.quantization_config``) when it was loaded with
    a quantisation config, and also when it de-quantised a GGUF file's weights to float32 on loading; the HF
    ``Trainer`` and peft treat such a model as untrainable and unmergeable. Without the flags it trains, merges and
    saves as the plain float model it is."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "quantization_method"):
        if flag in vars(model):
            delattr(model, flag)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def dequantized_peft_model(model: PeftModel, dtype: torch.dtype = torch.float32) -> PeftModel:
    """A full-precision copy of a PEFT model on a quantised base: the base de-quantised (:func:`dequantize_base`)
    and the same adapter weights, in plain peft layers that merge in full precision.

    Example::

        merged = dequantized_peft_model(task.model).merge_and_unload()
    """
    adapter = model.active_adapter
    config = model.peft_config[adapter]
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    state = {name: value.detach().clone() for name, value in state.items()}
    base = dequantize_base(_copied_base(model), dtype)
    plain = type(model)(base, copy.deepcopy(config), adapter_name=adapter)  # the same PeftModel class, same keys
    set_peft_model_state_dict(plain, state, adapter_name=adapter)
    return plain


def _copied_base(model: PeftModel) -> PreTrainedModel:
    """A deep copy of the HF model under ``model``'s adapter layers, without them (peft's ``unload`` on a copy)."""
    return copy.deepcopy(model).unload()
