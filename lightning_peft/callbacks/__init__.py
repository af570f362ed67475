"""Callbacks that work with every lightning-peft task."""

from lightning_peft.callbacks.prediction_writer import JsonlPredictionWriter

__all__ = ["JsonlPredictionWriter"]
