"""``PeftFSDPStrategy``: Lightning's FSDP with the wrapping a PEFT model needs, found from the model itself."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from peft.utils.other import fsdp_auto_wrap_policy
from torch import nn


def transformer_block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The classes of the transformer blocks of ``model`` (a PEFT or HF model), named by transformers'
    ``_no_split_modules`` of each sub-model (``BertLayer``, ``T5Block``, …)."""
    names = {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or [])}
    return {type(module) for module in model.modules() if type(module).__name__ in names}


class PeftFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` wrapped the way peft recommends, without naming classes in the config.

    When the task's model is connected, the auto-wrap policy becomes peft's ``fsdp_auto_wrap_policy``: one FSDP
    unit per transformer block (from the model's ``_no_split_modules``) and one per trainable leaf (LoRA ``A``/``B``,
    heads), so frozen and trainable weights never share a flat parameter (which would keep gradients and optimizer
    state for frozen weights). ``use_orig_params`` stays on (Lightning's default: parameter groups, requires_grad
    per parameter). ``activation_checkpointing_blocks: true`` checkpoints each transformer block. ``state_dict_type``
    ``full`` or ``sharded`` both give adapter-only checkpoints (our tasks keep only trainable weights).

    Example::

        trainer = Trainer(accelerator="gpu", devices=4, strategy=PeftFSDPStrategy(activation_checkpointing_blocks=True))
    """

    def __init__(self, activation_checkpointing_blocks: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.activation_checkpointing_blocks = activation_checkpointing_blocks

    def connect(self, model: LightningModule) -> None:
        super().connect(model)
        backbone = getattr(model, "model", None)
        if backbone is None or "auto_wrap_policy" in self.kwargs:
            return
        blocks = transformer_block_classes(backbone)
        self.kwargs["auto_wrap_policy"] = fsdp_auto_wrap_policy(backbone)
        if self.activation_checkpointing_blocks and blocks:
            self._activation_checkpointing_kwargs = {"check_fn": lambda module: isinstance(module, tuple(blocks))}
        rank_zero_info(f"FSDP units: each of {sorted(c.__name__ for c in blocks)} and each trainable leaf module")
