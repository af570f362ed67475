"""Figures: saved as PNG and sent to loggers that take images."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import torch

from lightning_peft.calibration import accuracy_coverage, reliability_bins
from lightning_peft.figures import accuracy_coverage_curve, reliability_diagram, save_figure
from tests.test_cli import child_env


class ImageLogger:
    def __init__(self) -> None:
        self.images: list[tuple[str, list[str]]] = []

    def log_image(self, key: str, images: list[str]) -> None:
        self.images.append((key, images))


def test_calibration_figures_are_saved_and_logged(tmp_path):
    confidences, correct = torch.tensor([0.9, 0.8, 0.6, 0.55]), torch.tensor([1.0, 1.0, 0.0, 1.0])
    logger = ImageLogger()
    trainer = SimpleNamespace(loggers=[logger], global_step=0)
    figure = reliability_diagram({"model": reliability_bins(confidences, correct)})
    path = save_figure(trainer, figure, tmp_path / "reliability.png", "test/reliability_diagram")
    curve = accuracy_coverage_curve(*accuracy_coverage(confidences, correct), aurc=0.1)
    save_figure(trainer, curve, tmp_path / "coverage.png", "test/accuracy_coverage")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert logger.images == [
        ("test/reliability_diagram", [str(tmp_path / "reliability.png")]),
        ("test/accuracy_coverage", [str(tmp_path / "coverage.png")]),
    ]


def test_importing_and_plotting_change_no_process_wide_state(tmp_path):
    """A notebook keeps its warnings filters and matplotlib backend (the CLI module filtered warnings at import, and
    plotting switched the backend to Agg)."""
    code = f"""
import warnings, matplotlib
backend = matplotlib.rcParams["backend"]
import lightning_peft.cli
from lightning_peft.figures import plotting, save_figure
figure, axes = plotting("test").subplots(figsize=(2, 2))
axes.plot([0, 1], [0, 1])
save_figure(None, figure, __import__("pathlib").Path({str(tmp_path / "f.png")!r}), "test")
assert not any("loftq" in str(f[1]) for f in warnings.filters), "lightning-peft changed the warnings filters"
assert matplotlib.rcParams["backend"] == backend, "backend changed"
"""
    subprocess.run([sys.executable, "-c", code], check=True, env=child_env())
    assert (tmp_path / "f.png").stat().st_size > 1000
