"""Callbacks that work with every lightning-peft task."""

from lightning_peft.callbacks.adalora import AdaLoRAScheduler
from lightning_peft.callbacks.prediction_writer import JsonlPredictionWriter

__all__ = ["AdaLoRAScheduler", "JsonlPredictionWriter"]
