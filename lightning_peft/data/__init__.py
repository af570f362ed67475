"""Datamodules: HF datasets or local files → tokenised, batched splits."""

from lightning_peft.data.augmentation import TextAugmentation
from lightning_peft.data.base import TextDataModule
from lightning_peft.data.chat import ChatDataModule
from lightning_peft.data.classification import ClassificationDataModule
from lightning_peft.data.labelled import LabelledDataModule
from lightning_peft.data.sampling import EpochSeededSampler
from lightning_peft.data.seq2seq import Seq2SeqDataModule
from lightning_peft.data.token_classification import TokenClassificationDataModule

__all__ = [
    "ChatDataModule",
    "ClassificationDataModule",
    "EpochSeededSampler",
    "LabelledDataModule",
    "Seq2SeqDataModule",
    "TextAugmentation",
    "TextDataModule",
    "TokenClassificationDataModule",
]
