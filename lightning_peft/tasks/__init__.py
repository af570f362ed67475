"""Task modules: a PEFT backbone plus a head, loss, metrics and prediction format."""

from lightning_peft.tasks.base import PeftModule
from lightning_peft.tasks.causal_lm import CausalGenerator
from lightning_peft.tasks.classification import SequenceClassifier
from lightning_peft.tasks.seq2seq import Seq2SeqGenerator
from lightning_peft.tasks.token_classification import TokenClassifier

__all__ = ["CausalGenerator", "PeftModule", "Seq2SeqGenerator", "SequenceClassifier", "TokenClassifier"]
