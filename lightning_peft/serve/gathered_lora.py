"""LoRA for a batch whose rows use different adapters, in two batched matrix products per layer.

peft's mixed-adapter forward (``adapter_names``) splits every LoRA layer's input by adapter and runs each piece
through that adapter: with n adapters in a batch, 2n small matrix products and n index copies per layer. Here
each row gathers its adapter's A and B from stacks built once (ranks padded with zeros, the scaling folded into
B), and the low-rank update of the whole batch is ``bmm(bmm(x, A_rowsᵀ), B_rowsᵀ)`` — the gathered form of
S-LoRA / Punica's batched LoRA, in plain torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear


class GatheredLora:
    """Stacked LoRA weights of every adapter of ``model`` and the context that applies them row by row.

    Example::

        gathered = GatheredLora.of(model)  # None when some layer is not a plain LoRA linear layer
        with gathered.routing(["a0", "a3", "a0"]):
            logits = model(**inputs, adapter_names=["a0", "a3", "a0"]).logits  # heads still routed by peft
    """

    def __init__(self, layers: dict[LoraLinear, tuple[torch.Tensor, torch.Tensor]], names: list[str]) -> None:
        self.layers = layers
        self.index = {name: i for i, name in enumerate(names)}

    @classmethod
    def of(cls, model: PeftModel) -> GatheredLora | None:
        """Stacks for ``model``'s adapters, or ``None`` where a layer is not plain LoRA on a linear layer (DoRA and
        other variants, embeddings, convolutions): peft's own mixed forward then serves them."""
        names = list(model.peft_config)
        layers = {}
        for module in model.modules():
            if not hasattr(module, "lora_A"):
                continue
            if not isinstance(module, LoraLinear) or module.lora_variant or module.merged:
                return None
            layers[module] = cls._stacks(module, names)
        return cls(layers, names) if layers else None

    @staticmethod
    def _stacks(layer: LoraLinear, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """A as (adapters, rank, in) and B·scaling as (adapters, out, rank); zeros where an adapter skips the
        layer or has a lower rank."""
        weight = layer.get_base_layer().weight
        rank = max(layer.r.get(name, 0) for name in names) or 1
        a = weight.new_zeros((len(names), rank, layer.in_features))
        b = weight.new_zeros((len(names), layer.out_features, rank))
        for i, name in enumerate(names):
            if name in layer.lora_A:
                r = layer.r[name]
                a[i, :r] = layer.lora_A[name].weight
                b[i, :, :r] = layer.lora_B[name].weight * layer.scaling[name]
        return a, b

    @contextmanager
    def routing(self, adapter_names: list[str]) -> Iterator[None]:
        """Within the block, the LoRA layers add each row's own adapter's update (and run no adapter of their
        own); the caller still passes ``adapter_names`` to the model for the heads (``modules_to_save``)."""
        rows = torch.tensor([self.index[name] for name in adapter_names])
        hooks = []
        for layer, (a, b) in self.layers.items():
            a_rows, b_rows = a[rows], b[rows]
            layer._disable_adapters = True

            def add_update(module, args, output, a_rows=a_rows, b_rows=b_rows):
                x = args[0].to(a_rows.dtype)
                flat = x.reshape(x.shape[0], -1, x.shape[-1])
                update = torch.bmm(torch.bmm(flat, a_rows.transpose(1, 2)), b_rows.transpose(1, 2))
                return output + update.reshape(*output.shape).to(output.dtype)

            hooks.append(layer.register_forward_hook(add_update))
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            for layer in self.layers:
                layer._disable_adapters = False
