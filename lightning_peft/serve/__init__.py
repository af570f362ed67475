"""``lightning-peft serve``: many exported adapters on one frozen base, over HTTP on LitServe."""

from lightning_peft.serve.engine import AdapterEngine
from lightning_peft.serve.exports import AdapterRefused, ServedAdapter, read_adapter

__all__ = ["AdapterEngine", "AdapterRefused", "ServedAdapter", "read_adapter"]
