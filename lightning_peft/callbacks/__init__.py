"""Callbacks that work with every lightning-peft task."""

from lightning_peft.callbacks.adalora import AdaLoraConfig, AdaLoRAScheduler
from lightning_peft.callbacks.adapter_export import AdapterExport
from lightning_peft.callbacks.adversarial import AdversarialTraining
from lightning_peft.callbacks.early_stopping import EarlyStopping
from lightning_peft.callbacks.prediction_writer import JsonlPredictionWriter
from lightning_peft.callbacks.temperature_scaling import TemperatureScaling
from lightning_peft.learning_rate_search import LearningRateSearch

__all__ = [
    "AdaLoraConfig",
    "AdaLoRAScheduler",
    "AdapterExport",
    "AdversarialTraining",
    "EarlyStopping",
    "JsonlPredictionWriter",
    "LearningRateSearch",
    "TemperatureScaling",
]
