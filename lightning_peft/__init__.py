"""lightning-peft: parameter-efficient fine-tuning of Hugging Face transformers, the Lightning way."""

from lightning_peft.backbone import BackboneConfig, load_backbone
from lightning_peft.callbacks import (
    AdaLoraConfig,
    AdaLoRAScheduler,
    AdapterExport,
    EarlyStopping,
    JsonlPredictionWriter,
)
from lightning_peft.data import (
    ClassificationDataModule,
    EpochSeededSampler,
    Seq2SeqDataModule,
    TextDataModule,
    TokenClassificationDataModule,
)
from lightning_peft.errors import LightningPeftError
from lightning_peft.metrics import EntityF1
from lightning_peft.tasks import PeftModule, Seq2SeqGenerator, SequenceClassifier, TokenClassifier

__version__ = "0.1.0"

__all__ = [
    "AdaLoRAScheduler",
    "AdaLoraConfig",
    "AdapterExport",
    "BackboneConfig",
    "ClassificationDataModule",
    "EarlyStopping",
    "EntityF1",
    "EpochSeededSampler",
    "JsonlPredictionWriter",
    "LightningPeftError",
    "PeftModule",
    "Seq2SeqDataModule",
    "Seq2SeqGenerator",
    "SequenceClassifier",
    "TextDataModule",
    "TokenClassificationDataModule",
    "TokenClassifier",
    "load_backbone",
]
