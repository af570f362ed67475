"""torchmetrics Metrics the libraries lack."""

from lightning_peft.metrics.entities import Entity, extract_entities, iob1_to_iob2
from lightning_peft.metrics.entity_f1 import EntityF1

__all__ = ["Entity", "EntityF1", "extract_entities", "iob1_to_iob2"]
