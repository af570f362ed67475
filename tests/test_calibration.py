"""Calibration metrics, temperature fitting and selective prediction (``lightning_peft.calibration``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_peft.calibration import (
    BrierScore,
    ConfidenceRecord,
    NegativeLogLikelihood,
    accuracy_coverage,
    aurc,
    calibration_metrics,
    fit_temperature,
    reliability_bins,
)


def probabilities_to_logits(probabilities: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probabilities).log()


def test_ece_and_mce_match_a_hand_computation():
    # 15 bins of width 1/15. Top-label confidences 0.95, 0.97 (bin [14/15, 1]: right once of twice) and
    # 0.61, 0.62 (bin [9/15, 10/15]: right both times)
    logits = probabilities_to_logits([[0.95, 0.05], [0.03, 0.97], [0.61, 0.39], [0.38, 0.62]])
    target = torch.tensor([0, 0, 0, 1])
    metrics = calibration_metrics(num_classes=2)
    metrics.update(logits, target)
    values = metrics.compute()
    high = abs((0.95 + 0.97) / 2 - 0.5)  # |mean confidence - accuracy| of the upper bin
    low = abs((0.61 + 0.62) / 2 - 1.0)  # and of the lower bin
    assert values["ece"].item() == pytest.approx(0.5 * high + 0.5 * low, abs=1e-6)
    assert values["mce"].item() == pytest.approx(max(high, low), abs=1e-6)


def test_nll_and_brier_match_a_hand_computation():
    logits = probabilities_to_logits([[0.8, 0.2], [0.3, 0.7]])
    target = torch.tensor([0, 0])
    nll, brier = NegativeLogLikelihood(), BrierScore()
    for metric in (nll, brier):
        metric.update(logits[:1], target[:1])
        metric.update(logits[1:], target[1:])  # accumulates across batches
    assert nll.compute().item() == pytest.approx(-(math.log(0.8) + math.log(0.3)) / 2, abs=1e-6)
    expected_brier = ((0.2**2 + 0.2**2) + (0.7**2 + 0.7**2)) / 2
    assert brier.compute().item() == pytest.approx(expected_brier, abs=1e-6)


def test_temperature_scaling_lowers_nll_of_an_overconfident_model():
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (500,), generator=generator)
    honest = torch.randn(500, 3, generator=generator) + 1.5 * F.one_hot(target, 3)
    overconfident = 6.0 * honest  # same ranking, far sharper probabilities
    temperature = fit_temperature(overconfident, target)
    assert temperature > 3.0
    before = F.cross_entropy(overconfident, target).item()
    after = F.cross_entropy(overconfident / temperature, target).item()
    assert after < before - 0.5
    # the fitted T is (numerically) the NLL minimum: nudging it either way does not help
    for nudged in (temperature * 0.9, temperature * 1.1):
        assert F.cross_entropy(overconfident / nudged, target).item() >= after - 1e-6


def test_accuracy_coverage_and_aurc():
    confidences = torch.tensor([0.9, 0.8, 0.7, 0.6])
    correct = torch.tensor([1.0, 0.0, 1.0, 0.0])
    coverage, accuracy = accuracy_coverage(confidences, correct)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert accuracy.tolist() == pytest.approx([1.0, 0.5, 2 / 3, 0.5])
    assert aurc(confidences, correct) == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)
    # a ranking that puts both errors last has the lower area
    assert aurc(torch.tensor([0.9, 0.6, 0.8, 0.7]), correct) < aurc(confidences, correct)
    assert math.isnan(aurc(torch.empty(0), torch.empty(0)))


def test_confidence_record_and_reliability_bins():
    record = ConfidenceRecord()
    record.update(probabilities_to_logits([[0.95, 0.05], [0.3, 0.7]]), torch.tensor([0, 0]))
    confidences, correct = record.compute()
    assert confidences.tolist() == pytest.approx([0.95, 0.7]) and correct.tolist() == [1.0, 0.0]
    confidence, accuracy, counts = reliability_bins(confidences, correct, n_bins=10)
    assert counts.sum() == 2 and counts[9] == 1 and counts[7] == 1
    assert accuracy[9] == 1.0 and accuracy[7] == 0.0 and confidence[9] == pytest.approx(0.95)


def test_confidence_record_computes_after_a_distributed_sync(tmp_path):
    """Under DDP torchmetrics syncs the list states into tensors before compute (a one-process gloo group here)."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        record = ConfidenceRecord()
        record.update(probabilities_to_logits([[0.95, 0.05], [0.3, 0.7]]), torch.tensor([0, 0]))
        confidences, correct = record.compute()
        assert confidences.tolist() == pytest.approx([0.95, 0.7]) and correct.tolist() == [1.0, 0.0]
    finally:
        dist.destroy_process_group()
