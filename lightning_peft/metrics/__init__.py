"""torchmetrics Metrics the libraries lack."""

from lightning_peft.metrics.entities import Entity, extract_entities, iob1_to_iob2
from lightning_peft.metrics.entity_f1 import EntityF1
from lightning_peft.metrics.generation import BLEU, ChrF, Rouge, generation_metrics

__all__ = ["BLEU", "ChrF", "Entity", "EntityF1", "Rouge", "extract_entities", "generation_metrics", "iob1_to_iob2"]
