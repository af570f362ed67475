"""lightning-peft: parameter-efficient fine-tuning of Hugging Face transformers, the Lightning way."""

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
    ClassificationDataModule,
    EpochSeededSampler,
    Seq2SeqDataModule,
    TextDataModule,
    TokenClassificationDataModule,
)
from lightning_peft.errors import LightningPeftError
from lightning_peft.metrics import EntityF1
from lightning_peft.regularization import Regularization
from lightning_peft.tasks import PeftModule, Seq2SeqGenerator, SequenceClassifier, TokenClassifier
from lightning_peft.training import TrainingConfig
from lightning_peft.uncertainty import PredictionOptions

__version__ = "0.1.0"

__all__ = [
    "AdaLoRAScheduler",
    "AdaLoraConfig",
    "AdapterExport",
    "AdversarialTraining",
    "BackboneConfig",
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
    "TextDataModule",
    "TokenClassificationDataModule",
    "TokenClassifier",
    "TrainingConfig",
    "load_backbone",
]
