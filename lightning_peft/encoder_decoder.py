"""Warm-start a ``transformers.EncoderDecoderModel`` from encoder checkpoints (BERT2BERT) and keep its
randomly initialised parts (cross-attention, LM-head transform) trained and saved under PEFT."""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from peft import PEFT_TYPE_TO_TUNER_MAPPING, PeftConfig
from peft.utils import constants as peft_constants
from transformers import AutoModel, AutoModelForCausalLM, EncoderDecoderModel, PreTrainedTokenizerBase

from lightning_peft.errors import LightningPeftError


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Decoder start, end and padding ids for a decoder that shares ``tokenizer``.

    BERT-style tokenizers have no BOS/EOS: ``[CLS]`` starts and ``[SEP]`` ends a sequence, as in their pretraining.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = {
        "decoder_start_token_id": bos if bos is not None else tokenizer.cls_token_id,
        "eos_token_id": eos if eos is not None else tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise LightningPeftError(
            f"backbone.tokenizer: {type(tokenizer).__name__} defines no token for {missing}; a warm-started "
            "encoder-decoder needs start (BOS or CLS), end (EOS or SEP) and padding tokens"
        )
    return ids


def randomly_initialised_modules(model: torch.nn.Module, missing_keys: set[str]) -> list[str]:
    """The largest modules of ``model`` all of whose parameters are in ``missing_keys`` (absent from the checkpoint,
    hence randomly initialised), e.g. every layer's ``crossattention`` and ``cls.predictions.transform``."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(parent + ".") for parent in found):
            continue
        params = [f"{name}.{p}" for p, _ in module.named_parameters(remove_duplicate=False)]
        if params and all(p in missing_keys for p in params):
            found.append(name)
    return found


def _check_leftovers(model: torch.nn.Module, missing_keys: set[str], modules: list[str]) -> None:
    """Missing parameters outside ``modules`` are not trained: fine if their initialisation is a constant
    (a bias of zeros is rebuilt identically), otherwise the model cannot be reloaded faithfully — say so."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for key in sorted(missing_keys):
        if key in params and not any(key.startswith(m + ".") for m in modules):
            value = params[key].detach()
            if value.numel() and not torch.all(value == value.flatten()[0]):
                rank_zero_warn(f"decoder parameter {key!r} is randomly initialised and not trained")


def warm_start_encoder_decoder(
    encoder_path: str,
    decoder_path: str,
    tokenizer: PreTrainedTokenizerBase,
    **kwargs: Any,
) -> tuple[EncoderDecoderModel, list[str]]:
    """An encoder-decoder whose encoder and decoder are loaded from (encoder) checkpoints; the decoder gets
    causal self-attention and new cross-attention. Returns the model and the names of its randomly initialised
    modules. ``kwargs`` (``revision``, ``dtype``, config overrides) go to both ``from_pretrained`` calls.

    Example::

        model, new_modules = warm_start_encoder_decoder("bert-base-uncased", "bert-base-uncased", tokenizer)
        new_modules[:1]  # ['decoder.bert.encoder.layer.0.crossattention']
    """
    encoder = AutoModel.from_pretrained(encoder_path, **kwargs)
    decoder, info = AutoModelForCausalLM.from_pretrained(
        decoder_path, is_decoder=True, add_cross_attention=True, output_loading_info=True, **kwargs
    )
    missing = set(info["missing_keys"])
    new_modules = randomly_initialised_modules(decoder, missing)
    _check_leftovers(decoder, missing, new_modules)
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder)
    for name, value in special_token_ids(tokenizer).items():
        setattr(model.config, name, value)
        setattr(model.generation_config, name, value)
    return model, [f"decoder.{name}" for name in new_modules]


def _default_mapping(peft_config: PeftConfig, kind: str = "TARGET") -> dict[str, list[str]]:
    """peft's per-architecture defaults: the tuner's ``target_module_mapping`` or peft's constants table."""
    tuner = PEFT_TYPE_TO_TUNER_MAPPING[peft_config.peft_type]
    table = f"TRANSFORMERS_MODELS_TO_{peft_config.peft_type.value}_{kind}_MODULES_MAPPING"
    return (getattr(tuner, "target_module_mapping", None) if kind == "TARGET" else None) or getattr(
        peft_constants, table, {}
    )


def _fill_default_targets(peft_config: PeftConfig, model_type: str) -> None:
    """Set ``target_modules`` (and IA3's ``feedforward_modules``) to peft's defaults for ``model_type`` encoders:
    peft looks defaults up by the model's type, which for ``encoder-decoder`` has none."""
    defaults = _default_mapping(peft_config).get(model_type)
    if defaults is None:
        raise LightningPeftError(
            f"peft.target_modules: peft has no default for {model_type!r} encoders with "
            f"{type(peft_config).__name__}; set target_modules"
        )
    peft_config.target_modules = set(defaults)
    if hasattr(peft_config, "feedforward_modules") and peft_config.feedforward_modules is None:
        peft_config.feedforward_modules = set(_default_mapping(peft_config, "FEEDFORWARD").get(model_type, []))
    rank_zero_info(f"peft.target_modules not set: peft's default for {model_type}: {sorted(defaults)}")


def train_new_modules(peft_config: PeftConfig, model: torch.nn.Module, new_modules: list[str]) -> PeftConfig:
    """A copy of ``peft_config`` that trains (and saves) ``new_modules`` in full through ``modules_to_save``,
    keeps the adapter off them (``exclude_modules``), and fills ``target_modules`` left unset with peft's
    defaults for the encoder's architecture (peft has none for ``encoder-decoder`` itself)."""
    if not new_modules:
        return peft_config
    name = type(peft_config).__name__
    if not hasattr(peft_config, "modules_to_save"):
        raise LightningPeftError(
            f"peft: {name} cannot train extra modules, but this warm-started encoder-decoder has randomly "
            f"initialised ones ({new_modules[0]}, …) that must be trained; use LoRA, IA3, LoHa, LoKr, …"
        )
    peft_config = copy.deepcopy(peft_config)
    if getattr(peft_config, "target_modules", "unset") is None:
        _fill_default_targets(peft_config, model.config.encoder.model_type)
    peft_config.modules_to_save = sorted({*(peft_config.modules_to_save or []), *new_modules})
    if hasattr(peft_config, "exclude_modules"):
        inside = [n for n, _ in model.named_modules() if any(n == m or n.startswith(m + ".") for m in new_modules)]
        given = peft_config.exclude_modules
        if isinstance(given, str):  # a regex: extend it
            peft_config.exclude_modules = "|".join([f"(?:{given})", *(re.escape(n) for n in inside)])
        else:
            peft_config.exclude_modules = sorted({*inside, *(given or [])})
    groups = sorted({m.rsplit(".", 1)[-1] if "layer." in m else m.removeprefix("decoder.") for m in new_modules})
    kept_out = f" and kept out of the {name} targets" if hasattr(peft_config, "exclude_modules") else ""
    rank_zero_info(
        f"warm-started encoder-decoder: {len(new_modules)} randomly initialised modules ({', '.join(groups)}) are "
        f"trained in full (peft modules_to_save){kept_out}"
    )
    return peft_config
