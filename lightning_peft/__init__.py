"""lightning-peft: parameter-efficient fine-tuning of Hugging Face transformers, the Lightning way.

The public names below are imported on first use (PEP 562), so ``import lightning_peft.data`` or
``import lightning_peft.training`` loads only what it needs, not the task stack.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# peft imports torchao whenever it is installed (the quantization extra); on CPU torchao logs a warning per CUDA-only
# kernel library it skips, and torch logs a deprecation per enum torchao registers: lines at every start-up that say
# nothing about the run. Real errors still show.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

#: public name → the module that defines it
_EXPORTS = {
    "AdaLoRAScheduler": "lightning_peft.callbacks",
    "AdaLoraConfig": "lightning_peft.callbacks",
    "AdapterExport": "lightning_peft.callbacks",
    "AdversarialTraining": "lightning_peft.callbacks",
    "BackboneConfig": "lightning_peft.backbone",
    "CausalGenerator": "lightning_peft.tasks",
    "ChatDataModule": "lightning_peft.data",
    "ClassificationDataModule": "lightning_peft.data",
    "EarlyStopping": "lightning_peft.callbacks",
    "EntityF1": "lightning_peft.metrics",
    "EpochSeededSampler": "lightning_peft.data",
    "JsonlPredictionWriter": "lightning_peft.callbacks",
    "LightningPeftError": "lightning_peft.errors",
    "PeftModule": "lightning_peft.tasks",
    "PredictionOptions": "lightning_peft.uncertainty",
    "Regularization": "lightning_peft.regularization",
    "Seq2SeqDataModule": "lightning_peft.data",
    "Seq2SeqGenerator": "lightning_peft.tasks",
    "SequenceClassifier": "lightning_peft.tasks",
    "TemperatureScaling": "lightning_peft.callbacks",
    "TextAugmentation": "lightning_peft.data",
    "TextDataModule": "lightning_peft.data",
    "TokenClassificationDataModule": "lightning_peft.data",
    "TokenClassifier": "lightning_peft.tasks",
    "TrainingConfig": "lightning_peft.training",
    "load_backbone": "lightning_peft.backbone",
}

__all__ = [
    "AdaLoRAScheduler",
    "AdaLoraConfig",
    "AdapterExport",
    "AdversarialTraining",
    "BackboneConfig",
    "CausalGenerator",
    "ChatDataModule",
    "ClassificationDataModule",
    "EarlyStopping",
    "EntityF1",
    "EpochSeededSampler",
    "JsonlPredictionWriter",
    "LightningPeftError",
    "PeftModule",
    "PredictionOptions",
    "Regularization",
    "Seq2SeqDataModule",
    "Seq2SeqGenerator",
    "SequenceClassifier",
    "TemperatureScaling",
    "TextAugmentation",
    "TextDataModule",
    "TokenClassificationDataModule",
    "TokenClassifier",
    "TrainingConfig",
    "load_backbone",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_peft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # what type checkers and IDEs see
    from lightning_peft.backbone import BackboneConfig, load_backbone
    from lightning_peft.callbacks import (
        AdaLoraConfig,
        AdaLoRAScheduler,
        AdapterExport,
        AdversarialTraining,
        EarlyStopping,
        JsonlPredictionWriter,
        TemperatureScaling,
    )
    from lightning_peft.data import (
        ChatDataModule,
        ClassificationDataModule,
        EpochSeededSampler,
        Seq2SeqDataModule,
        TextAugmentation,
        TextDataModule,
        TokenClassificationDataModule,
    )
    from lightning_peft.errors import LightningPeftError
    from lightning_peft.metrics import EntityF1
    from lightning_peft.regularization import Regularization
    from lightning_peft.tasks import CausalGenerator, PeftModule, Seq2SeqGenerator, SequenceClassifier, TokenClassifier
    from lightning_peft.training import TrainingConfig
    from lightning_peft.uncertainty import PredictionOptions
