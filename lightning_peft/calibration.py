"""Calibration and selective prediction: metrics (DDP-synchronised torchmetrics), temperature fitting, AURC.

ECE and MCE are torchmetrics' ``MulticlassCalibrationError`` (top-label, 15 equal-width bins, L1 / max norm);
NLL and the Brier score are small torchmetrics ``Metric`` s with summed states; :class:`ConfidenceRecord` keeps
each example's top-label confidence and correctness for the reliability diagram and the accuracy–coverage curve.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassCalibrationError
from torchmetrics.utilities import dim_zero_cat

CALIBRATION_BINS = 15


class _ExampleMean(Metric):
    """The mean over examples of :meth:`summed` (a per-batch sum), with summed states (DDP-synchronised)."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")

    def summed(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        # out of place: states reset inside inference mode are inference tensors
        self.total = self.total + self.summed(logits.float(), target).double()
        self.count = self.count + target.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp_min(1)).float()


class NegativeLogLikelihood(_ExampleMean):
    """Mean negative log-likelihood of the gold class under ``softmax(logits)``.

    Example::

        nll = NegativeLogLikelihood()
        nll.update(torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
        nll.compute()  # tensor(0.1269)
    """

    def summed(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, reduction="sum")


class BrierScore(_ExampleMean):
    """Mean multi-class Brier score ``Σ_k (p_k − 1[k = y])²`` (0 is perfect, 2 the worst).

    Example::

        brier = BrierScore()
        brier.update(torch.tensor([[0.0, 0.0]]), torch.tensor([1]))
        brier.compute()  # tensor(0.5000)
    """

    def summed(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probabilities = logits.softmax(-1)
        return (probabilities - F.one_hot(target, probabilities.shape[-1]).to(probabilities)).pow(2).sum()


class ConfidenceRecord(Metric):
    """Every example's top-label confidence and whether that label was right, gathered across processes."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("confidences", [], dist_reduce_fx="cat")
        self.add_state("correct", [], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        confidence, predicted = logits.float().softmax(-1).max(-1)
        self.confidences.append(confidence)
        self.correct.append((predicted == target).float())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.confidences, list) and not self.confidences:
            return torch.empty(0), torch.empty(0)
        return dim_zero_cat(self.confidences), dim_zero_cat(self.correct)  # lists until synced, then tensors


def calibration_metrics(num_classes: int) -> MetricCollection:
    """``ece``, ``mce``, ``nll`` and ``brier`` over logits and integer targets."""
    return MetricCollection(
        {
            "ece": MulticlassCalibrationError(num_classes, n_bins=CALIBRATION_BINS, norm="l1"),
            "mce": MulticlassCalibrationError(num_classes, n_bins=CALIBRATION_BINS, norm="max"),
            "nll": NegativeLogLikelihood(),
            "brier": BrierScore(),
        }
    )


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature ``T > 0`` minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017), by LBFGS on
    ``log T`` (so ``T`` stays positive)."""
    logits, log_t = logits.detach().float(), torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def accuracy_coverage(confidences: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective prediction: keeping the k most confident examples, for k = 1…n, the coverage ``k/n`` and the
    accuracy on those kept."""
    order = confidences.argsort(descending=True, stable=True)
    kept = torch.arange(1, len(order) + 1, dtype=torch.float64)
    accuracy = correct[order].double().cumsum(0) / kept
    return (kept / len(order)).float(), accuracy.float()


def aurc(confidences: torch.Tensor, correct: torch.Tensor) -> float:
    """Area under the risk–coverage curve (Geifman & El-Yaniv): the mean, over k, of the error rate of the k most
    confident examples. Lower is better; a perfect ranking gives ``≈ e + (1−e)·ln(1−e)`` at error rate ``e``."""
    if not len(confidences):
        return float("nan")
    _, accuracy = accuracy_coverage(confidences, correct)
    return float((1 - accuracy.double()).mean())


def reliability_bins(
    confidences: torch.Tensor, correct: torch.Tensor, n_bins: int = CALIBRATION_BINS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per equal-width confidence bin: the mean confidence, the accuracy and the example count (a confidence on a
    boundary goes to the upper bin; 1.0 to the last)."""
    boundaries = torch.linspace(0, 1, n_bins + 1)
    index = (torch.bucketize(confidences.float(), boundaries, right=True) - 1).clamp(0, n_bins - 1)
    counts = torch.zeros(n_bins).scatter_add_(0, index, torch.ones_like(confidences.float()))
    confidence = torch.zeros(n_bins).scatter_add_(0, index, confidences.float()) / counts.clamp_min(1)
    accuracy = torch.zeros(n_bins).scatter_add_(0, index, correct.float()) / counts.clamp_min(1)
    return confidence, accuracy, counts
