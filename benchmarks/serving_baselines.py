"""The servers ``benchmarks/serving.py`` compares against, written the way a user would with LitServe by hand.

    python benchmarks/serving_baselines.py merged PORT ADAPTER_DIR           # one adapter merged, batched
    python benchmarks/serving_baselines.py switching PORT ADAPTER_DIR [...]  # set_adapter per request

Both answer ``POST /predict`` with ``{"adapter": name, "inputs": [text]}`` (adapters are named a0, a1, … in the
order given) like ``lightning-peft serve``.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import litserve as ls
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def load_base(adapter_dir: str) -> tuple[Any, Any, list[str]]:
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    labels = json.loads((Path(adapter_dir) / "labels.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(config["base_model_name_or_path"],
                                                              num_labels=labels["num_labels"])
    return base, AutoTokenizer.from_pretrained(adapter_dir), list(labels["id2label"].values())


def records(logits: torch.Tensor, labels: list[str]) -> list[dict[str, Any]]:
    return [{"label": labels[int(row.argmax())], "probabilities": dict(zip(labels, row.tolist(), strict=True))}
            for row in logits.float().softmax(-1)]


class MergedAPI(ls.LitAPI):
    """One adapter merged into its base; LitServe batches requests."""

    def __init__(self, adapter_dir: str) -> None:
        super().__init__(max_batch_size=32, batch_timeout=0.005)
        self.adapter_dir = adapter_dir

    def setup(self, device: str) -> None:
        base, self.tokenizer, self.labels = load_base(self.adapter_dir)
        self.model = PeftModel.from_pretrained(base, self.adapter_dir).merge_and_unload().eval()

    def decode_request(self, request):  # unannotated: LitServe then reads the JSON body
        return request["inputs"][0]

    def batch(self, inputs: list[str]) -> list[str]:
        return inputs

    @torch.inference_mode()
    def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        encoded = self.tokenizer(texts, padding=True, return_tensors="pt")
        return records(self.model(**encoded).logits, self.labels)

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return {"outputs": [output]}


class SwitchingAPI(ls.LitAPI):
    """One PeftModel holding every adapter; each request sets its adapter and runs alone."""

    def __init__(self, adapter_dirs: list[str]) -> None:
        super().__init__(max_batch_size=1)
        self.adapter_dirs = adapter_dirs

    def setup(self, device: str) -> None:
        base, self.tokenizer, self.labels = load_base(self.adapter_dirs[0])
        self.model = PeftModel.from_pretrained(base, self.adapter_dirs[0], adapter_name="a0")
        for i, adapter_dir in enumerate(self.adapter_dirs[1:], start=1):
            self.model.load_adapter(adapter_dir, adapter_name=f"a{i}")
        self.model.eval()

    def decode_request(self, request):  # unannotated: LitServe then reads the JSON body
        return request

    @torch.inference_mode()
    def predict(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        self.model.set_adapter(request["adapter"])
        encoded = self.tokenizer(request["inputs"], padding=True, return_tensors="pt")
        return records(self.model(**encoded).logits, self.labels)

    def encode_response(self, output: list[dict[str, Any]]) -> dict[str, Any]:
        return {"outputs": output}


def stop_on_sigterm(*_: Any) -> None:
    raise KeyboardInterrupt  # LitServe shuts its workers down on Ctrl-C; a bare SIGTERM would orphan them


def main() -> None:
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    kind, port, adapter_dirs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    api = MergedAPI(adapter_dirs[0]) if kind == "merged" else SwitchingAPI(adapter_dirs)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=False)
    server.run(host="127.0.0.1", port=port, num_api_servers=1, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
