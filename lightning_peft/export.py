"""Exports: the directory layout, atomic writes, merging an adapter into its base, exporting a checkpoint.

An export directory holds ``adapter/`` (``save_pretrained``: adapter config + safetensors, the tokenizer and the
task's files such as ``labels.json``), optionally ``merged/`` (a full ``transformers`` model with the adapter folded
into its weights) and ``README.md``, the model card.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from lightning.pytorch.utilities import rank_zero_warn
from peft import PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME as SAFETENSORS_FILE
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from lightning_peft.adapter_checkpoint import METRICS_KEY, rank_pattern, set_rank_pattern
from lightning_peft.checkpoints import load_checkpoint
from lightning_peft.compressed import (
    INT8_DIR,
    ONNX_DIR,
    check_compression_available,
    loading_notes,
    save_int8,
    save_onnx,
)
from lightning_peft.errors import LightningPeftError
from lightning_peft.model_card import task_model_card
from lightning_peft.quantization import dequantized_peft_model, is_quantized

if TYPE_CHECKING:
    from lightning_peft.tasks.base import PeftModule

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
CARD_FILE = "README.md"
#: what the card adds under ``merged/`` when the adapter was trained on a quantised base
DEQUANTIZED_MERGE_NOTE = (
    "\n\nThe base was quantised in training: it was de-quantised to float32 (the very weights the quantised layers "
    "computed with) and the adapter merged into them in float32, so this model is the trained one in full precision, "
    "not re-quantised."
)


class CannotMerge(LightningPeftError):
    """The PEFT method cannot be folded into the base weights (the message says why)."""


#: file every export directory holds: what marks a directory as ours to replace on the next export
EXPORT_MARKER = ".lightning-peft-export"


class ExistingOutput(LightningPeftError):
    """An output path holds something lightning-peft did not write (the message names it and the fix)."""


def adapter_directory(path: str | Path) -> Path:
    """The adapter directory of an export (``<export>/adapter``), or ``path`` itself when it is one."""
    path = Path(path).expanduser().absolute()
    return path / ADAPTER_DIR if (path / ADAPTER_DIR).is_dir() else path


def check_replaceable(target: Path, field: str, overwrite: bool) -> None:
    """Raise :class:`ExistingOutput` unless ``target`` is absent, an empty directory, an earlier export (it holds
    :data:`EXPORT_MARKER`), or ``overwrite`` is set. ``field`` names the setting in the message (``export_dir``:
    the command's ``--export_dir``, whose switch is ``--overwrite``; otherwise an object with an ``overwrite``
    option, e.g. ``AdapterExport.dirpath``)."""
    switch = "--overwrite true" if field == "export_dir" else f"{field.split('.')[0]}(overwrite=true)"
    if overwrite or not (target.exists() or target.is_symlink()):
        return
    if not target.is_dir():
        raise ExistingOutput(
            f"{field}: {str(target)!r} is an existing file, not an export directory; choose another path "
            f"(or pass {switch} to replace it)"
        )
    if (target / EXPORT_MARKER).is_file() or _is_unmarked_export(target) or not any(target.iterdir()):
        return
    raise ExistingOutput(
        f"{field}: {str(target)!r} already holds files that no lightning-peft export wrote; choose a new or empty "
        f"directory (or pass {switch} to replace its contents)"
    )


def _is_unmarked_export(directory: Path) -> bool:
    """An export written before exports carried :data:`EXPORT_MARKER`: exactly its layout, model card included."""
    names = {path.name for path in directory.iterdir()}
    return CARD_FILE in names and names <= {ADAPTER_DIR, MERGED_DIR, CARD_FILE}


def _write_error(field: str, target: Path, err: OSError) -> LightningPeftError:
    reason = err.strerror or str(err) or type(err).__name__
    where = f" ({err.filename})" if err.filename and str(err.filename) != str(target) else ""
    return LightningPeftError(
        f"{field}: cannot write {str(target)!r}: {reason}{where}; nothing was changed there. Free space, fix the "
        "permissions or choose another path"
    )


@contextmanager
def atomic_directory(directory: str | Path, field: str = "export_dir", overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces ``directory`` by renames.

    ``directory`` may only be replaced when it is an earlier export (or empty), unless ``overwrite``; the new one is
    marked with :data:`EXPORT_MARKER`. On an exception the temporary directory is removed and an existing
    ``directory`` is left untouched; write failures (disk full, permissions, an impossible path) become one
    :class:`LightningPeftError` naming ``field``.

    Example::

        with atomic_directory("exports/sst2") as tmp:
            model.save_pretrained(tmp)
    """
    target = Path(directory).absolute()
    check_replaceable(target, field, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as err:
        raise _write_error(field, target, err) from err
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; give it the permissions a plain mkdir would
    try:
        yield tmp
        (tmp / EXPORT_MARKER).write_text("written by lightning-peft; the next export may replace this directory\n")
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise _write_error(field, target, err) from err
        raise
    backup = None
    if target.exists() or target.is_symlink():
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        backup.rmdir()
        target.rename(backup)
    tmp.rename(target)
    if backup is not None:
        if backup.is_dir() and not backup.is_symlink():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            backup.unlink()


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it replaces ``path`` by a rename, on an exception it is
    removed and an existing ``path`` is left untouched.

    Example::

        with atomic_file("runs/explanations/explanation.json") as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def merged_model(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """A full model with the active adapter merged into a copy of the base weights (``merge_and_unload``); the
    model itself when it has no adapter. Raises :class:`CannotMerge` for methods that add inputs instead of
    changing weights (prompt, prefix and p-tuning).

    On a quantised base the copy is de-quantised first and the adapter merged in float32
    (:func:`~lightning_peft.quantization.dequantized_peft_model`): the float model the quantised one computes
    with, plus the adapter, instead of peft's merge that re-quantises each merged weight."""
    if not isinstance(model, PeftModel):
        return model
    config = model.active_peft_config
    method = config.peft_type.value
    if config.is_prompt_learning:
        raise CannotMerge(
            f"{method} adds trained virtual tokens to every input instead of changing the model's weights, so it "
            "cannot be merged into the base model; load the adapter with peft instead"
        )
    merged = dequantized_peft_model(model) if is_quantized(model) else copy.deepcopy(model)
    _unwrap_modules_to_save(merged)
    try:
        return merged.merge_and_unload()
    except (AttributeError, NotImplementedError, ValueError) as err:
        raise CannotMerge(f"peft cannot merge {method} into the base weights ({err}); load the adapter") from err


def _unwrap_modules_to_save(model: PeftModel) -> None:
    """Put each fully trained module (``modules_to_save``) in place of its wrapper, as unloading does. peft's own
    unloading assumes such modules are linear layers for every method but LoRA, and fails on others (e.g. the
    cross-attention blocks of a warm-started encoder-decoder)."""
    for name, module in list(model.base_model.model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent, _, child = name.rpartition(".")
            trained = module.modules_to_save[module.active_adapters[0]]
            setattr(model.base_model.model.get_submodule(parent) if parent else model.base_model.model, child, trained)


@contextmanager
def swapped_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, the entries of ``module``'s state dict named in ``state`` hold those values; its own are
    restored afterwards."""
    own = module.state_dict()
    saved = {name: own[name].detach().clone() for name in state if name in own}
    module.load_state_dict(state, strict=False)
    try:
        yield
    finally:
        module.load_state_dict(saved, strict=False)


@contextmanager
def weights_from(module: PeftModule, checkpoint: dict[str, Any]) -> Iterator[None]:
    """Within the block, ``module`` holds the checkpoint's weights (and rank pattern); its own are restored after."""
    own_rank_pattern = rank_pattern(module.model)
    module.on_load_checkpoint(checkpoint)
    try:
        with swapped_state(module, checkpoint["state_dict"]):
            yield
    finally:
        set_rank_pattern(module.model, own_rank_pattern)


#: LoRA initialisations that move part of each targeted weight into the adapter, changing the base weights
BASE_CHANGING_INITS = ("pissa", "olora", "corda")


def initial_adapter_state(model: PreTrainedModel | PeftModel) -> dict[str, torch.Tensor] | None:
    """The adapter weights right after a PiSSA / OLoRA / CorDA initialisation (``None`` for other methods): what
    :func:`save_adapter` needs to turn the trained adapter into a plain LoRA adapter over the original base."""
    config = model.active_peft_config if isinstance(model, PeftModel) else None
    if not str(getattr(config, "init_lora_weights", "")).lower().startswith(BASE_CHANGING_INITS):
        return None
    return {name: param.detach().clone() for name, param in model.named_parameters() if ".lora_" in name}


def save_adapter(model: PeftModel, directory: Path, initial_state: dict[str, torch.Tensor] | None = None) -> None:
    """``model.save_pretrained(directory)``; after a base-changing initialisation (``initial_state``), rewritten as a
    plain LoRA adapter over the *original* base weights, so ``PeftModel.from_pretrained(base, directory)`` reproduces
    the trained model: ``ΔW = BA − B₀A₀ = [B | −B₀]·[A ; A₀]``, rank and alpha doubled (peft's own conversion,
    ``path_initial_model_for_weight_conversion``, drops ``modules_to_save`` such as classifier heads)."""
    model.save_pretrained(directory)
    if initial_state is None:
        return
    adapter = model.active_adapter
    initial = {name.replace(f".{adapter}.", "."): value for name, value in initial_state.items()}
    weights_file = directory / SAFETENSORS_FILE
    weights = load_file(weights_file)
    for name, value in weights.items():
        if ".lora_A." in name:
            weights[name] = torch.cat([value, initial[name].to(value)], dim=0)
        elif ".lora_B." in name:
            weights[name] = torch.cat([value, -initial[name].to(value)], dim=1)
    save_file(weights, weights_file, metadata={"format": "pt"})
    config_file = directory / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["init_lora_weights"] = True
    config["r"] *= 2
    config["lora_alpha"] *= 2**0.5 if config.get("use_rslora") else 2  # same scaling: alpha/r or alpha/sqrt(r)
    for pattern in ("rank_pattern", "alpha_pattern"):
        config[pattern] = {key: 2 * value for key, value in (config.get(pattern) or {}).items()}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_checkpoint(
    module: PeftModule,
    ckpt_path: str | Path,
    directory: str | Path,
    tokenizer: Any | None = None,
    merge: bool = False,
    data: dict[str, Any] | None = None,
    overwrite: bool = False,
    field: str = "export_dir",
    quantize: str | None = None,
    onnx: bool = False,
) -> Path:
    """Export the weights of the Lightning checkpoint ``ckpt_path`` (e.g. ``best.ckpt``) with the model card's
    metrics and training facts taken from it; ``module`` keeps its own weights.

    Example::

        export_checkpoint(model, "runs/sst2/checkpoints/best.ckpt", "runs/sst2/export", tokenizer, merge=True)
    """
    ckpt_path = Path(ckpt_path)
    checkpoint = load_checkpoint(ckpt_path)
    training = {"checkpoint": ckpt_path.name, "epoch": checkpoint.get("epoch"),
                "optimizer steps": checkpoint.get("global_step")}
    with weights_from(module, checkpoint):
        return module.export(directory, tokenizer, merge, metrics=checkpoint.get(METRICS_KEY, {}), data=data,
                             training=training, overwrite=overwrite, field=field, quantize=quantize, onnx=onnx)


def export_task(
    task: PeftModule,
    directory: str | Path,
    tokenizer: Any | None = None,
    merge: bool = False,
    metrics: dict[str, float] | None = None,
    data: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    overwrite: bool = False,
    field: str = "export_dir",
    quantize: str | None = None,
    onnx: bool = False,
) -> Path:
    """Write ``task``'s model in Hugging Face formats, atomically, and return the directory.

    An existing ``directory`` is replaced only when it is an earlier export (or empty), unless ``overwrite``;
    otherwise, and when the disk refuses the write, a :class:`LightningPeftError` names ``field``.

    ``adapter/``: the adapter (``save_pretrained``), loadable by ``peft.AutoPeftModelFor*`` and by
    ``transformers.AutoModelFor*.from_pretrained(adapter, **labels)``; ``merged/`` (with ``merge``, or always
    without PEFT): a full model for plain ``transformers``; ``README.md``: the model card, stating ``metrics``,
    ``data`` and ``training`` facts. The tokenizer (when given) and the task's ``save_extras`` files go in each.
    ``quantize="int8"`` adds ``int8/`` and ``onnx`` adds ``onnx/`` (:mod:`~lightning_peft.compressed`), both made
    from the merged model, which is then written too; encoder tasks only (``task.compressed_export``).

    Example::

        export_task(model, "runs/sst2/export", tokenizer, merge=True)  # what model.export(...) calls
    """
    directory = Path(directory)
    is_adapter = isinstance(task.model, PeftModel)
    compress = quantize is not None or onnx
    if compress:
        check_compressible(task, quantize, onnx)
    merged_note = ""
    with atomic_directory(directory, field, overwrite) as tmp:
        if is_adapter:
            save_adapter(task.model, tmp / ADAPTER_DIR, task.initial_adapter_state)
            _save_alongside(task, tmp / ADAPTER_DIR, tokenizer)
        if merge or not is_adapter or compress:
            try:
                full = merged_model(task.model)
            except CannotMerge as err:
                merged_note = f"Not written: {err}."
                rank_zero_warn(f"export: no {MERGED_DIR}/ — {err}")
            else:
                full.save_pretrained(tmp / MERGED_DIR)
                _save_alongside(task, tmp / MERGED_DIR, tokenizer)
                if quantize:
                    save_int8(tmp / MERGED_DIR, task.auto_model_class, tmp / INT8_DIR)
                    _save_alongside(task, tmp / INT8_DIR, tokenizer)
                if onnx:
                    save_onnx(full, tmp / ONNX_DIR, quantize is not None)
                    _save_alongside(task, tmp / ONNX_DIR, tokenizer)
                merged_note = (
                    "A full model with the adapter merged into its weights; no peft needed:\n\n"
                    f"```python\n{task.merged_loading_snippet(directory / MERGED_DIR)}\n```"
                    + (DEQUANTIZED_MERGE_NOTE if is_quantized(task.model) else "")
                )
                compressed = loading_notes(task.auto_model_class.__name__, directory, quantize, onnx)
                merged_note += f"\n\n{compressed}" if compressed else ""
        loading = (task.loading_snippet(directory / ADAPTER_DIR) if is_adapter
                   else task.merged_loading_snippet(directory / MERGED_DIR))
        card = task_model_card(task, loading, merged_note if is_adapter else "", metrics or {}, data or {},
                               training or {}).render()
        (tmp / CARD_FILE).write_text(card)
        if is_adapter:
            (tmp / ADAPTER_DIR / CARD_FILE).write_text(card)  # replaces peft's blank template
    return directory


def check_compressible(task: PeftModule, quantize: str | None, onnx: bool, prefix: str = "--") -> None:
    """Refuse ``quantize`` / ``onnx`` (the settings ``<prefix>quantize`` / ``<prefix>onnx``) for tasks and methods
    they cannot serve, and when the backend is missing, before anything is written."""
    flag = f"{prefix}quantize" if quantize is not None else f"{prefix}onnx"
    check_compression_available(quantize, onnx, prefix)
    if not task.compressed_export:
        raise LightningPeftError(
            f"{flag}: compressed exports are made for encoder tasks (SequenceClassifier, TokenClassifier); "
            f"{type(task).__name__} generates text, so export it without {flag} (adapter/ and merged/)"
        )
    config = task.model.active_peft_config if isinstance(task.model, PeftModel) else None
    if config is not None and config.is_prompt_learning:
        raise LightningPeftError(
            f"{flag}: {config.peft_type.value} adds virtual tokens instead of changing weights, so there is no merged "
            f"model to compress; use a method that merges (LoRA, IA3, …) or export without {flag}"
        )


def _save_alongside(task: PeftModule, directory: Path, tokenizer: Any | None) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    task.save_extras(directory)


def hub_operations(directory: Path) -> list[CommitOperationAdd]:
    """The files of an export as the Hub repository holds them: the adapter's files at the root (so
    ``AutoPeftModelFor*.from_pretrained(repo_id)`` loads it; without PEFT, the merged model's), the merged model
    under ``merged/`` (``from_pretrained(repo_id, subfolder="merged")``), compressed exports under ``int8/`` and
    ``onnx/``, the model card as the root README.md."""
    root = directory / ADAPTER_DIR if (directory / ADAPTER_DIR).is_dir() else directory / MERGED_DIR
    sources = [(root, "")]
    for name in (MERGED_DIR, INT8_DIR, ONNX_DIR):
        if (directory / name).is_dir() and directory / name != root:
            sources.append((directory / name, f"{name}/"))
    return [CommitOperationAdd(path_in_repo=prefix + path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
            for folder, prefix in sources for path in sorted(folder.rglob("*")) if path.is_file()]


def push_export(directory: str | Path, repo_id: str, private: bool | None = None, field: str = "--push_to_hub") -> str:
    """Upload the export in ``directory`` to the Hub repository ``repo_id`` (created if needed) in one commit, laid
    out by :func:`hub_operations`; returns the commit's URL. Failures (no network, no token, no permission) raise
    one :class:`LightningPeftError` naming ``field``; the export stays on disk either way.

    Example::

        push_export("runs/sst2/export", "my-org/minilm-sst2-lora")
    """
    directory = Path(directory)
    if not (directory / CARD_FILE).is_file():
        raise LightningPeftError(f"{field}: {str(directory)!r} is not an export (no {CARD_FILE}); export first")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.create_commit(repo_id, hub_operations(directory),
                                   commit_message=f"lightning-peft export ({directory.name})")
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError, ValueError) as err:
        raise LightningPeftError(
            f"{field}: uploading {str(directory)!r} to {repo_id!r} failed ({type(err).__name__}: {err}); the export "
            "is intact on disk — check the repo id and your token (`hf auth login` or HF_TOKEN), or push it later"
        ) from err
    return commit.commit_url
