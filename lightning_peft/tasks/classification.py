"""``SequenceClassifier``: single-label, multi-label and regression heads over a PEFT backbone."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from peft import PeftConfig, TaskType
from torchmetrics import MeanSquaredError, MetricCollection, PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelF1Score,
)
from transformers import AutoModelForSequenceClassification

from lightning_peft.backbone import BackboneConfig
from lightning_peft.errors import LightningPeftError
from lightning_peft.regularization import Regularization, symmetric_kl
from lightning_peft.tasks.base import Batch, PeftModule, label_config

ProblemType = Literal["single_label_classification", "multi_label_classification", "regression"]


def bernoulli_logits(logits: torch.Tensor) -> torch.Tensor:
    """Independent sigmoid outputs ``[..., L]`` as two-class logits ``[..., L, 2]`` (``σ(x) = softmax([0, x])₁``)."""
    return torch.stack([torch.zeros_like(logits), logits], dim=-1)


class SequenceClassifier(PeftModule):
    """Classify (or score) a text or a text pair.

    Args:
        labels: label names, in id order; the CLI links them from the datamodule. Not used for regression.
        problem_type: ``single_label_classification`` (cross-entropy), ``multi_label_classification``
            (binary cross-entropy, sigmoid ≥ ``threshold``) or ``regression`` (MSE on one output).
        threshold: decision threshold for multi-label prediction.
        Other arguments: see :class:`~lightning_peft.tasks.base.PeftModule`.

    Example::

        from peft import LoraConfig
        model = SequenceClassifier(
            backbone=BackboneConfig("bert-base-uncased"),
            peft=LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]),
            labels=["negative", "positive"],
        )

    Subclass and override :meth:`forward` to swap the head, or :meth:`compute_loss` to swap the loss
    (``examples/custom_head.py``).
    """

    auto_model_class = AutoModelForSequenceClassification
    peft_task_type = TaskType.SEQ_CLS

    def __init__(
        self,
        backbone: BackboneConfig,
        peft: PeftConfig | None = None,
        labels: list[str] | None = None,
        problem_type: ProblemType = "single_label_classification",
        threshold: float = 0.5,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler_type: str = "linear",
        warmup_ratio: float = 0.0,
        micro_batch_size: int | None = 16,
        regularization: Regularization | None = None,
    ) -> None:
        super().__init__(
            backbone, peft, optimizer, lr_scheduler_type, warmup_ratio, micro_batch_size, regularization
        )
        if problem_type == "regression":
            labels = None
            if self.regularization.label_smoothing:
                raise LightningPeftError(
                    "model.regularization.label_smoothing: regression has no classes to smooth; set it to 0"
                )
        elif not labels:
            raise LightningPeftError(
                "model.labels: a classifier needs its label names (the CLI links them from the datamodule)"
            )
        self.labels = list(labels) if labels else None
        self.problem_type = problem_type
        self.threshold = threshold
        self.build_backbone(**self.model_config_kwargs())

    def model_config_kwargs(self) -> dict[str, Any]:
        if not self.labels:
            return {"num_labels": 1, "problem_type": self.problem_type}
        return {**label_config(self.labels), "problem_type": self.problem_type}

    @property
    def num_outputs(self) -> int:
        return len(self.labels) if self.labels else 1

    def build_metrics(self) -> MetricCollection:
        if self.problem_type == "regression":
            return MetricCollection(
                {"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef(), "mse": MeanSquaredError()}
            )
        n = self.num_outputs
        if self.problem_type == "multi_label_classification":
            return MetricCollection(
                {
                    "accuracy": MultilabelAccuracy(num_labels=n, threshold=self.threshold),
                    "f1": MultilabelF1Score(num_labels=n, threshold=self.threshold, average="macro"),
                }
            )
        return MetricCollection(
            {
                "accuracy": MulticlassAccuracy(num_classes=n, average="micro"),
                "f1": MulticlassF1Score(num_classes=n, average="macro"),
            }
        )

    def forward(self, batch: Batch) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return self.model(**inputs).logits

    def compute_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        labels = batch["labels"]
        if self.problem_type == "regression":
            return F.mse_loss(logits.squeeze(-1), labels.float())
        if self.problem_type == "multi_label_classification":
            targets = labels.float() * (1 - self.label_smoothing) + self.label_smoothing / 2
            return F.binary_cross_entropy_with_logits(logits, targets)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def rdrop_divergence(self, logits_a: torch.Tensor, logits_b: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Symmetric KL between the two passes' class distributions; per-label Bernoulli distributions for
        multi-label problems (averaged over labels); the squared difference of the two scores for regression."""
        if self.problem_type == "regression":
            return F.mse_loss(logits_a.float(), logits_b.float())
        if self.problem_type == "multi_label_classification":  # each label a two-class distribution
            return symmetric_kl(bernoulli_logits(logits_a), bernoulli_logits(logits_b))
        return symmetric_kl(logits_a, logits_b)

    def update_metrics(self, metrics: MetricCollection, logits: torch.Tensor, batch: Batch) -> None:
        labels = batch["labels"]
        if self.problem_type == "regression":
            metrics.update(logits.squeeze(-1).float(), labels.float())
        elif self.problem_type == "multi_label_classification":
            metrics.update(torch.sigmoid(logits.float()), labels.long())
        else:
            metrics.update(logits.float(), labels)

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict[str, Any]]:
        """One record per example: its ``text`` (and ``text_pair``), then ``label`` (or ``labels`` / ``score``)
        and per-label ``probabilities``."""
        logits = self(batch).float()
        inputs = [
            {k: batch[k][i] for k in ("text", "text_pair") if k in batch} for i in range(self.batch_size_of(batch))
        ]
        if self.problem_type == "regression":
            outputs = [{"score": value} for value in logits.squeeze(-1).tolist()]
        elif self.problem_type == "multi_label_classification":
            outputs = [
                {
                    "labels": [name for name, p in zip(self.labels, row, strict=True) if p >= self.threshold],
                    "probabilities": dict(zip(self.labels, row, strict=True)),
                }
                for row in torch.sigmoid(logits).tolist()
            ]
        else:
            outputs = [
                {"label": self.labels[row.index(max(row))], "probabilities": dict(zip(self.labels, row, strict=True))}
                for row in torch.softmax(logits, dim=-1).tolist()
            ]
        return [{**given, **output} for given, output in zip(inputs, outputs, strict=True)]
