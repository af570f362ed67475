"""Reading checkpoints as data: safe loading, ``best`` / ``last`` by name, and a check against the user's config.

A checkpoint is something a colleague or the internet hands over: it is loaded with ``torch.load(weights_only=True)``
(tensors and plain data, never code), and its hyper-parameters are compared with the config, never merged into it.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from lightning_peft.errors import LightningPeftError

#: checkpoint names ``--ckpt_path`` accepts besides a file: resolved in ``checkpoint.dirpath``
NAMED_CHECKPOINTS = ("best", "last")


def load_checkpoint(ckpt_path: str | Path, field: str = "--ckpt_path") -> dict[str, Any]:
    """A Lightning checkpoint read on the CPU as plain data, or one clear error naming ``field``.

    Example::

        checkpoint = load_checkpoint("runs/sst2/checkpoints/best.ckpt")
        checkpoint["state_dict"].keys()
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise LightningPeftError(f"{field}: {str(path)!r} does not exist or is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives; this is text, a bare pickle, …
            raise LightningPeftError(
                f"{field}: {str(path)!r} is not a checkpoint torch.save wrote (not a zip archive); give the .ckpt "
                "file a fit wrote"
            ) from err
        raise LightningPeftError(
            f"{field}: {str(path)!r} holds Python objects besides tensors and plain data, and lightning-peft never "
            "unpickles them (they can run code); use a checkpoint written by lightning-peft"
        ) from err
    except Exception as err:  # a truncated zip, a text file, …: torch raises several types
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LightningPeftError(
            f"{field}: cannot read {str(path)!r} as a checkpoint ({cause}); the file is truncated or not a "
            "Lightning checkpoint"
        ) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise LightningPeftError(f"{field}: {str(path)!r} is not a Lightning checkpoint (it has no state_dict)")
    return checkpoint


def resolve_named_checkpoint(ckpt_path: str, dirpath: str | None, filename: str | None) -> str:
    """``best`` / ``last`` as the file a fit with this config wrote in ``dirpath``; any other value as it is."""
    if ckpt_path not in NAMED_CHECKPOINTS:
        return ckpt_path
    if not dirpath:
        raise LightningPeftError(
            f"--ckpt_path {ckpt_path}: the config sets no checkpoint.dirpath to look in; give the checkpoint file "
            "(e.g. runs/<run>/checkpoints/best.ckpt) or the --checkpoint.dirpath the fit wrote to"
        )
    name = "last" if ckpt_path == "last" else (filename or "best")
    if "{" in name:
        raise LightningPeftError(
            f"--ckpt_path best: checkpoint.filename {filename!r} is a template, so the best file has no fixed name; "
            f"give the checkpoint file from {dirpath}"
        )
    path = Path(dirpath) / f"{name}.ckpt"
    if not path.is_file():
        raise LightningPeftError(
            f"--ckpt_path {ckpt_path}: {str(path)} does not exist; run fit with this config first, or give the "
            "checkpoint file"
        )
    return str(path)


def _peft_method(peft: Any) -> str:
    """``LORA``, ``IA3``, … of a saved PEFT config (dict) or a config entry (``class_path``: ``peft.LoraConfig``)."""
    if not peft:
        return "none (full fine-tuning)"
    if isinstance(peft, dict) and peft.get("peft_type"):
        return str(peft["peft_type"]).upper()
    class_path = getattr(peft, "class_path", None) or (peft.get("class_path") if isinstance(peft, dict) else None)
    if class_path is None:
        return type(peft).__name__.removesuffix("Config").upper()
    return class_path.rsplit(".", 1)[-1].removesuffix("Config").upper()


def _same_model_path(a: str | None, b: str | None) -> bool:
    """Whether two backbone paths name the same model: equal, the same directory, or the same directory name (a
    checkpoint made on a colleague's machine names their copy of the model)."""
    if a == b:
        return True
    if a is None or b is None:
        return False
    if Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve():
        return True
    return Path(a).name == Path(b).name


def checkpoint_mismatch(checkpoint: dict[str, Any], model_config: Any) -> str | None:
    """Why ``checkpoint`` was not written by the model that ``model_config`` (the config's ``model`` entry:
    ``class_path`` + ``init_args``) builds, or ``None`` when its task, backbone and PEFT method agree."""
    hparams = checkpoint.get("hyper_parameters") or {}
    if not hparams or model_config is None:
        return None
    get = model_config.get if hasattr(model_config, "get") else lambda key, default=None: default
    class_path = get("class_path")
    saved_class = hparams.get("_class_path")
    if saved_class and class_path and saved_class.rsplit(".", 1)[-1] != class_path.rsplit(".", 1)[-1]:
        return f"it holds a {saved_class.rsplit('.', 1)[-1]} but the config's model.class_path is {class_path}"
    init_args = get("init_args") or {}
    backbone = init_args.get("backbone") if hasattr(init_args, "get") else None
    saved_backbone = hparams.get("backbone") or {}
    if backbone is not None and isinstance(saved_backbone, dict):
        for key in ("pretrained_model_name_or_path", "decoder_pretrained_model_name_or_path"):
            ours, theirs = backbone.get(key) if hasattr(backbone, "get") else None, saved_backbone.get(key)
            if key in saved_backbone and not _same_model_path(ours, theirs):
                return f"it was trained on backbone.{key} {theirs!r} but the config gives {ours!r}"
    if "peft" in hparams and hasattr(init_args, "get"):
        saved_method, method = _peft_method(hparams.get("peft")), _peft_method(init_args.get("peft"))
        if saved_method != method:
            return f"it was trained with PEFT method {saved_method} but the config's model.init_args.peft is {method}"
    return None


def check_checkpoint_matches(checkpoint: dict[str, Any], model_config: Any, ckpt_path: str) -> None:
    """Raise one clear error when the checkpoint's task, backbone or PEFT method disagrees with the config."""
    problem = checkpoint_mismatch(checkpoint, model_config)
    if problem:
        raise LightningPeftError(
            f"--ckpt_path {ckpt_path}: {problem}; use the config the checkpoint was trained with"
        )
