"""Reload an export with plain transformers + peft and compute logits: importable, and runnable as a script so that
a fresh process proves the export loads without lightning-peft (it imports only torch, transformers and peft).

    python tests/reload_export.py spec.json   # spec: auto, base, config, decoder, adapter, merged, inputs, out
"""

from __future__ import annotations

import json
import sys
from typing import Any

import peft
import torch
import transformers


def reload_logits(spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Logits on ``spec["inputs"]`` of ``PeftModel.from_pretrained`` on the adapter and of the merged model."""
    auto = getattr(transformers, spec["auto"])
    if spec["decoder"]:
        base = transformers.EncoderDecoderModel.from_encoder_decoder_pretrained(spec["base"], spec["decoder"])
    else:
        base = auto.from_pretrained(spec["base"], **spec["config"])
    models = {"adapter": peft.PeftModel.from_pretrained(base, spec["adapter"])}
    if spec.get("merged"):
        models["merged"] = auto.from_pretrained(spec["merged"])
    inputs = torch.load(spec["inputs"]) if isinstance(spec["inputs"], str) else spec["inputs"]
    with torch.no_grad():
        return {name: model.eval()(**inputs).logits for name, model in models.items()}


if __name__ == "__main__":
    with open(sys.argv[1]) as file:
        spec = json.load(file)
    logits = reload_logits(spec)
    assert "lightning_peft" not in sys.modules
    torch.save(logits, spec["out"])
