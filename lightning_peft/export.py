"""Exports: the directory layout, atomic writes, merging an adapter into its base, exporting a checkpoint.

An export directory holds ``adapter/`` (``save_pretrained``: adapter config + safetensors, the tokenizer and the
task's files such as ``labels.json``), optionally ``merged/`` (a full ``transformers`` model with the adapter folded
into its weights) and ``README.md``, the model card.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from lightning_peft.errors import LightningPeftError

if TYPE_CHECKING:
    from lightning_peft.tasks.base import PeftModule

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
CARD_FILE = "README.md"


class CannotMerge(LightningPeftError):
    """The PEFT method cannot be folded into the base weights (the message says why)."""


@contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces ``directory`` by renames.

    On an exception the temporary directory is removed and an existing ``directory`` is left untouched.

    Example::

        with atomic_directory("exports/sst2") as tmp:
            model.save_pretrained(tmp)
    """
    target = Path(directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; give it the permissions a plain mkdir would
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if target.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        backup.rmdir()
        target.rename(backup)
    tmp.rename(target)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def merged_model(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """A full model with the active adapter merged into a copy of the base weights (``merge_and_unload``); the
    model itself when it has no adapter. Raises :class:`CannotMerge` for methods that add inputs instead of
    changing weights (prompt, prefix and p-tuning)."""
    if not isinstance(model, PeftModel):
        return model
    config = model.active_peft_config
    method = config.peft_type.value
    if config.is_prompt_learning:
        raise CannotMerge(
            f"{method} adds trained virtual tokens to every input instead of changing the model's weights, so it "
            "cannot be merged into the base model; load the adapter with peft instead"
        )
    try:
        return copy.deepcopy(model).merge_and_unload()
    except (AttributeError, NotImplementedError, ValueError) as err:
        raise CannotMerge(f"peft cannot merge {method} into the base weights ({err}); load the adapter") from err


@contextmanager
def weights_from(module: PeftModule, checkpoint: dict[str, Any]) -> Iterator[None]:
    """Within the block, ``module`` holds the checkpoint's trainable weights; its own are restored afterwards."""
    own = {name: param.detach().clone() for name, param in module.named_parameters() if param.requires_grad}
    own_rank_pattern = module.rank_pattern
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    try:
        yield
    finally:
        module.load_state_dict(own, strict=False)
        module.rank_pattern = own_rank_pattern


def export_checkpoint(
    module: PeftModule,
    ckpt_path: str | Path,
    directory: str | Path,
    tokenizer: Any | None = None,
    merge: bool = False,
    data: dict[str, Any] | None = None,
) -> Path:
    """Export the weights of the Lightning checkpoint ``ckpt_path`` (e.g. ``best.ckpt``) with the model card's
    metrics and training facts taken from it; ``module`` keeps its own weights.

    Example::

        export_checkpoint(model, "runs/sst2/checkpoints/best.ckpt", "runs/sst2/export", tokenizer, merge=True)
    """
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise LightningPeftError(f"--ckpt_path: {str(ckpt_path)!r} does not exist or is not a file")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    training = {"checkpoint": ckpt_path.name, "epoch": checkpoint.get("epoch"),
                "optimizer steps": checkpoint.get("global_step")}
    with weights_from(module, checkpoint):
        return module.export(directory, tokenizer=tokenizer, merge=merge, metrics=checkpoint.get("metrics", {}),
                             data=data, training=training)
