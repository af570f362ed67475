"""``SequenceClassifier``: single-label, multi-label and regression heads over a PEFT backbone."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from peft import PeftConfig, PeftModel, TaskType
from torchmetrics import MeanSquaredError, MetricCollection, PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelF1Score,
)
from transformers import AutoModelForSequenceClassification

from lightning_peft import figures
from lightning_peft.backbone import BackboneConfig
from lightning_peft.batching import MicroBatches
from lightning_peft.calibration import (
    ConfidenceRecord,
    accuracy_coverage,
    aurc,
    calibration_metrics,
    reliability_bins,
)
from lightning_peft.errors import LightningPeftError
from lightning_peft.regularization import kl_to_target, symmetric_kl
from lightning_peft.tasks.base import LABELS_FILE, PeftModule, label_config
from lightning_peft.training import TrainingConfig
from lightning_peft.types import CONSISTENCY, AttributionTarget, Batch, ProblemType
from lightning_peft.uncertainty import (
    CALIBRATION_FILE,
    PredictionOptions,
    adapter_temperature,
    as_prediction_options,
    dropout_on,
    summarise_samples,
)

RELIABILITY_FILE = "reliability_diagram.png"
COVERAGE_FILE = "accuracy_coverage.png"


def bernoulli_logits(logits: torch.Tensor) -> torch.Tensor:
    """Independent sigmoid outputs ``[..., L]`` as two-class logits ``[..., L, 2]`` (``σ(x) = softmax([0, x])₁``)."""
    return torch.stack([torch.zeros_like(logits), logits], dim=-1)


def label_records(distribution: dict[str, torch.Tensor], labels: list[str]) -> list[dict[str, Any]]:
    """Per row of a class ``distribution`` (see :func:`~lightning_peft.uncertainty.summarise_samples`): the most
    probable ``label``, every label's ``probabilities``, the ``confidence`` and the ``entropy``; what ``predict``
    writes and the server answers."""
    records = []
    for mean, entropy in zip(distribution["mean"].tolist(), distribution["entropy"].tolist(), strict=True):
        confidence = max(mean)
        records.append({"label": labels[mean.index(confidence)], "probabilities": dict(zip(labels, mean, strict=True)),
                        "confidence": confidence, "entropy": entropy})
    return records


#: names transformers gives sequence-classification heads (encoders: classifier; decoders: score)
HEAD_NAMES = ("classifier", "score")


@contextmanager
def mixed_inputs(module: torch.nn.Module, mix: float, shuffled: torch.Tensor) -> Iterator[None]:
    """Within the block, ``module``'s first input is ``mix·x + (1−mix)·x[shuffled]`` (mixup along the batch)."""
    handle = module.register_forward_pre_hook(
        lambda _module, args: (mix * args[0] + (1 - mix) * args[0][shuffled], *args[1:])
    )
    try:
        yield
    finally:
        handle.remove()


class SequenceClassifier(PeftModule):
    """Classify (or score) a text or a text pair.

    Args:
        labels: label names, in id order; the CLI links them from the datamodule. Not used for regression.
        problem_type: ``single_label_classification`` (cross-entropy), ``multi_label_classification``
            (binary cross-entropy, sigmoid ≥ ``threshold``) or ``regression`` (MSE on one output).
        threshold: decision threshold for multi-label prediction.
        prediction: single-label only: MC dropout, adapter ensembles and abstention in ``predict`` (see
            :class:`~lightning_peft.uncertainty.PredictionOptions`).
        mixup_alpha: mixup on the pooled representation (0: off). In training, the inputs of the classification
            head (``classifier`` / ``score``: one pooled row per example) are mixed with those of a shuffled copy of
            the batch, ``λ ~ Beta(α, α)`` per batch, and the loss is ``λ·L(y) + (1−λ)·L(y_shuffled)`` — for
            cross-entropy exactly the loss of the soft label ``λ·y + (1−λ)·y_shuffled``. Works with packed rows
            (the head sees one row per example however the encoder ran) and micro-batches (mixed within each);
            not with R-Drop. 0.2-0.4 is usual.
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

    Single-label classifiers also report calibration: ``ece``, ``mce``, ``nll`` and ``brier`` in validation and
    test; at test, ``test/aurc`` (selective prediction) and two PNGs in the log directory, sent to the logger:
    ``reliability_diagram.png`` and ``accuracy_coverage.png``. A fitted ``temperature`` (see
    :class:`~lightning_peft.callbacks.TemperatureScaling`) divides the logits in ``predict``, is saved in
    checkpoints and exports (``calibration.json``), and adds ``test/<metric>_scaled``.
    """

    auto_model_class = AutoModelForSequenceClassification
    peft_task_type = TaskType.SEQ_CLS
    compressed_export = True
    pipeline_tag = "text-classification"
    inference_arguments = ("prediction",)

    @classmethod
    def checkpoint_metric(cls, init_args: dict[str, Any]) -> tuple[str, str]:
        """Accuracy for single-label, macro-F1 for multi-label (rare labels), the loss for regression."""
        problem_type = init_args.get("problem_type") or "single_label_classification"
        return {"regression": ("val/loss", "min"), "multi_label_classification": ("val/f1", "max")}.get(
            problem_type, ("val/accuracy", "max")
        )

    def __init__(
        self,
        backbone: BackboneConfig,
        peft: PeftConfig | None = None,
        labels: list[str] | None = None,
        problem_type: ProblemType = "single_label_classification",
        threshold: float = 0.5,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        training: TrainingConfig | None = None,
        prediction: PredictionOptions | None = None,
        mixup_alpha: float = 0.0,
    ) -> None:
        super().__init__(backbone, peft, optimizer, training)
        if mixup_alpha < 0:
            raise LightningPeftError(
                f"model.init_args.mixup_alpha: {mixup_alpha} — the Beta distribution's alpha must be > 0 (0.2-0.4 is "
                "usual), or 0 for no mixup"
            )
        if mixup_alpha and self.regularization.rdrop_alpha:
            raise LightningPeftError(
                f"model.init_args.mixup_alpha: {mixup_alpha} — mixup does not combine with "
                "training.regularization.rdrop_alpha (two passes over different mixes); set one of them to 0"
            )
        self.mixup_alpha = mixup_alpha
        if problem_type == "regression":
            labels = None
            if self.regularization.label_smoothing:
                raise LightningPeftError(
                    "model.init_args.training.regularization.label_smoothing: regression has no classes to smooth; "
                    "set it to 0"
                )
        elif not labels:
            raise LightningPeftError(
                "model.labels: a classifier needs its label names (the CLI links them from the datamodule)"
            )
        self.labels = list(labels) if labels else None
        self.problem_type = problem_type
        self.threshold = threshold
        self.prediction = as_prediction_options(prediction)
        if not self.is_single_label and not self.prediction.is_default:
            raise LightningPeftError(
                "model.prediction: MC dropout, ensembles and abstention are implemented for single-label "
                f"classification, not {problem_type}"
            )
        #: softmax temperature (1: none); fitted by the TemperatureScaling callback, kept in checkpoints and exports
        self.register_buffer("temperature", torch.ones(()))
        self.build_backbone(**self.model_config_kwargs())
        if self.is_single_label:
            self.scaled_test_metrics = calibration_metrics(self.num_outputs).clone(prefix="test/", postfix="_scaled")
            self.test_confidences = ConfidenceRecord()
            self.scaled_test_confidences = ConfidenceRecord()

    @property
    def is_single_label(self) -> bool:
        return self.problem_type == "single_label_classification"

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
                **calibration_metrics(n),
            }
        )

    def forward(self, batch: Batch) -> torch.Tensor:
        inputs = self.model_inputs(batch)
        return self.model(**inputs).logits

    def compute_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        labels = batch["labels"]
        if self.problem_type == "regression":
            return F.mse_loss(logits.squeeze(-1), labels.float())
        if self.problem_type == "multi_label_classification":
            targets = labels.float() * (1 - self.label_smoothing) + self.label_smoothing / 2
            return F.binary_cross_entropy_with_logits(logits, targets)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def training_loss(self, batch: Batch) -> torch.Tensor:
        """With :attr:`mixup_alpha`, the mixup loss of one (micro-/packed) batch; with rows and their augmented views
        (``data.augmentation.consistency``), the rows' loss plus the weighted divergence of each view's prediction
        from its row's; otherwise the task's own."""
        if CONSISTENCY in batch:
            return self.consistency_loss(batch)
        if not self.mixup_alpha:
            return super().training_loss(batch)
        labels = batch["labels"]
        mix = float(torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha).sample())
        shuffled = torch.randperm(labels.shape[0], device=labels.device)
        with mixed_inputs(self.classification_head(), mix, shuffled):
            logits = self(batch)
        return mix * self.compute_loss(logits, batch) + (1 - mix) * self.compute_loss(
            logits, {**batch, "labels": labels[shuffled]})

    def consistency_loss(self, batch: Batch) -> torch.Tensor:
        """For a batch of rows followed by their augmented views: the task loss of the rows as they are, plus
        ``batch["consistency"]`` × the divergence of each view's prediction from its row's, the row's taken as a
        fixed target (UDA's consistency term; the views' labels are not trained on). The rows must arrive whole and
        in order: packed rows or one padded pass, not micro-batches sorted by length."""
        self.check_consistency_fits()
        logits = self(batch)
        clean, augmented = logits.chunk(2)
        half = {key: value[: clean.shape[0]] for key, value in batch.items() if isinstance(value, torch.Tensor)}
        weight = float(batch[CONSISTENCY][0])
        return self.compute_loss(clean, half) + weight * self.consistency_divergence(clean, augmented)

    def check_consistency_fits(self) -> None:
        """Refuse what would break the pairing of rows and views: another term that mixes or doubles the batch, or
        length-sorted micro-batches, which reorder the rows."""
        term = ("model.init_args.mixup_alpha" if self.mixup_alpha
                else "model.init_args.training.regularization.rdrop_alpha" if self.regularization.rdrop_alpha else None)
        if term:
            raise LightningPeftError(
                f"data.init_args.augmentation.consistency: does not combine with {term} (it would mix or double the "
                "rows the consistency term pairs with their views); set one of the two to 0"
            )
        if isinstance(self.batching, MicroBatches):
            why = self.packing_blocker() or "model.init_args.training.sequence_packing is off or not possible"
            raise LightningPeftError(
                "data.init_args.augmentation.consistency: pairs each row with its view in one pass, but this fit "
                f"computes its batches in {self.batching.describe()} ({why}); set "
                "model.init_args.training.micro_batch_size: null (one padded pass)"
            )

    def classification_head(self) -> torch.nn.Module:
        """The module that turns the pooled representation into logits (``classifier``, or ``score`` for decoder
        classifiers; peft's wrapper around it when the head is trained as ``modules_to_save``)."""
        for name, module in self.model.named_modules():
            if name.rpartition(".")[2] in HEAD_NAMES:
                return module
        raise LightningPeftError(
            f"model.init_args.mixup_alpha: {type(self.model).__name__} has no module named {' or '.join(HEAD_NAMES)} "
            "whose inputs could be mixed; set mixup_alpha to 0"
        )

    def rdrop_divergence(self, logits_a: torch.Tensor, logits_b: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Symmetric KL between the two passes' predictions (see :meth:`prediction_divergence`)."""
        return self.prediction_divergence(logits_a, logits_b, symmetric_kl)

    def consistency_divergence(self, target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """How far ``logits`` predict from ``target_logits``, held fixed: the KL from the target's distribution (see
        :meth:`prediction_divergence`)."""
        return self.prediction_divergence(target_logits.detach(), logits, kl_to_target)

    def prediction_divergence(self, logits_a: torch.Tensor, logits_b: torch.Tensor,
                              kl: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``kl`` of the class distributions; of per-label Bernoulli distributions for multi-label problems
        (averaged over labels); the squared difference of the two scores for regression."""
        if self.problem_type == "regression":
            return F.mse_loss(logits_a.float(), logits_b.float())
        if self.problem_type == "multi_label_classification":  # each label a two-class distribution
            return kl(bernoulli_logits(logits_a), bernoulli_logits(logits_b))
        return kl(logits_a, logits_b)

    def update_metrics(self, metrics: MetricCollection, logits: torch.Tensor, batch: Batch) -> None:
        labels = batch["labels"]
        if self.problem_type == "regression":
            metrics.update(logits.squeeze(-1).float(), labels.float())
        elif self.problem_type == "multi_label_classification":
            metrics.update(torch.sigmoid(logits.float()), labels.long())
        else:
            metrics.update(logits.float(), labels)

    # -- test report: calibration before / after the temperature, selective prediction ----------------------
    @property
    def is_temperature_scaled(self) -> bool:
        return float(self.temperature) != 1.0

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        logits, _ = self._evaluation_step(batch, "test", self.test_metrics)
        if self.is_single_label:
            logits, labels = logits.float(), batch["labels"]
            self.test_confidences.update(logits, labels)
            if self.is_temperature_scaled:
                self.scaled_test_metrics.update(logits / self.temperature, labels)
                self.scaled_test_confidences.update(logits / self.temperature, labels)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if not self.is_single_label:
            return
        raw = self.test_confidences.compute()
        scaled = self.scaled_test_confidences.compute() if self.is_temperature_scaled else raw
        if self.is_temperature_scaled:
            self.log_dict(self.scaled_test_metrics.compute())
            self.scaled_test_metrics.reset()
        area = aurc(*scaled)
        self.log("test/aurc", area)
        self.test_confidences.reset()
        self.scaled_test_confidences.reset()
        if self.trainer.is_global_zero and len(raw[0]):
            self.save_test_figures(raw, scaled, area)

    def save_test_figures(self, raw: tuple[torch.Tensor, ...], scaled: tuple[torch.Tensor, ...], area: float) -> None:
        """The reliability diagram (before and after the temperature) and the accuracy–coverage curve, as PNGs in
        the log directory, sent to the loggers that take images."""
        if figures.plotting("test report") is None:
            return
        directory = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        curves = {"model": reliability_bins(*(t.cpu() for t in raw))}
        if self.is_temperature_scaled:
            curves[f"temperature {float(self.temperature):.3f}"] = reliability_bins(*(t.cpu() for t in scaled))
        for figure, name, key in (
            (figures.reliability_diagram(curves), RELIABILITY_FILE, "test/reliability_diagram"),
            (figures.accuracy_coverage_curve(*accuracy_coverage(*(t.cpu() for t in scaled)), area), COVERAGE_FILE,
             "test/accuracy_coverage"),
        ):
            rank_zero_info(f"{key.split('/')[1].replace('_', ' ')} saved to "
                           f"{figures.save_figure(self.trainer, figure, directory / name, key)}")

    # -- prediction -----------------------------------------------------------------------------------------
    def on_predict_start(self) -> None:
        """Load the :attr:`prediction` ensemble's adapters next to the model's own (once)."""
        for index, path in enumerate(self.prediction.ensemble):
            self._load_ensemble_member(f"ensemble_{index}", path)

    def _load_ensemble_member(self, name: str, path: str) -> None:
        if not isinstance(self.model, PeftModel):
            raise LightningPeftError("model.prediction.ensemble: needs a PEFT model (model.peft) to load adapters into")
        labels_file = Path(path) / LABELS_FILE
        if labels_file.is_file():
            theirs = list(json.loads(labels_file.read_text()).get("id2label", {}).values())
            if theirs != self.labels:
                raise LightningPeftError(
                    f"model.prediction.ensemble: {path} was trained on labels {theirs}, this model has {self.labels}"
                )
        if name in self.model.peft_config:
            return
        try:
            self.model.load_adapter(path, adapter_name=name, torch_device=str(self.device))
        except Exception as err:  # peft's errors: a different base model, PEFT type or head
            raise LightningPeftError(f"model.prediction.ensemble: cannot load {path} into this model: {err}") from err

    def untrained_weights(self) -> list[str]:
        """None when predicting with an ensemble: only the exported adapters (heads included) are used."""
        return [] if self.prediction.ensemble else super().untrained_weights()

    def ensemble_members(self) -> list[tuple[str | None, float]]:
        """(adapter name, temperature) per member; ``None`` is the model's own adapter."""
        if not self.prediction.ensemble:
            return [(None, float(self.temperature))]
        return [(f"ensemble_{i}", adapter_temperature(p)) for i, p in enumerate(self.prediction.ensemble)]

    def class_distribution(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Per example: ``mean`` class probabilities over the ensemble members and MC-dropout samples (each
        member's logits divided by its temperature), predictive ``entropy`` and per-class ``std``."""
        samples = []
        own = self.model.active_adapter if isinstance(self.model, PeftModel) else None
        passes = self.prediction.mc_samples or 1
        try:
            with dropout_on(self.model) if self.prediction.mc_samples else nullcontext():
                for adapter, temperature in self.ensemble_members():
                    if adapter is not None:
                        self.model.set_adapter(adapter)
                    samples += [(self(batch).float() / temperature).softmax(-1) for _ in range(passes)]
        finally:
            if own is not None and self.prediction.ensemble:
                self.model.set_adapter(own)
        return summarise_samples(torch.stack(samples))

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict[str, Any]]:
        """One record per example: its ``text`` (and ``text_pair``), then ``label`` (or ``labels`` / ``score``)
        and per-label ``probabilities``; single-label records also carry ``confidence`` and ``entropy``, ``std``
        per label with MC dropout or an ensemble, and ``abstained`` / ``predicted`` with ``abstain_below``."""
        inputs = [
            {k: batch[k][i] for k in ("text", "text_pair") if k in batch} for i in range(self.batch_size_of(batch))
        ]
        if self.is_single_label:
            outputs = self.single_label_records(self.class_distribution(batch))
        elif self.problem_type == "regression":
            outputs = [{"score": value} for value in self(batch).float().squeeze(-1).tolist()]
        else:
            outputs = [
                {
                    "labels": [name for name, p in zip(self.labels, row, strict=True) if p >= self.threshold],
                    "probabilities": dict(zip(self.labels, row, strict=True)),
                }
                for row in torch.sigmoid(self(batch).float()).tolist()
            ]
        return [{**given, **output} for given, output in zip(inputs, outputs, strict=True)]

    def single_label_records(self, distribution: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        sampled = bool(self.prediction.mc_samples or self.prediction.ensemble)
        records = []
        for record, std in zip(label_records(distribution, self.labels), distribution["std"].tolist(), strict=True):
            confidence, label = record["confidence"], record["label"]
            if sampled:
                record["std"] = dict(zip(self.labels, std, strict=True))
            if self.prediction.abstain_below is not None:
                abstained = confidence < self.prediction.abstain_below
                record.update(label=None if abstained else label, abstained=abstained, predicted=label)
            records.append(record)
        return records

    # -- export ---------------------------------------------------------------------------------------------
    def save_extras(self, directory: Path) -> None:
        """``labels.json``, and ``calibration.json`` with the fitted temperature when there is one."""
        super().save_extras(directory)
        if self.is_temperature_scaled:
            calibration = {"temperature": float(self.temperature), "usage": "probabilities = softmax(logits / T)"}
            (directory / CALIBRATION_FILE).write_text(json.dumps(calibration, indent=2) + "\n")

    def explanation_encoding(self, tokenizer: Any, text: str, max_length: int) -> Any:
        return tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")

    def attribution_targets(self, logits: torch.Tensor, encoding: Any, text: str,
                            target: str | None) -> tuple[dict[str, Any], list[AttributionTarget]]:
        """The predicted label and its probabilities; explained: the logit of ``target`` (default: the predicted
        label)."""
        labels = self.labels or ["score"]
        predicted = int(logits[0].argmax())
        if target is None:
            index = predicted
        elif target in labels:
            index = labels.index(target)
        else:
            raise LightningPeftError(f"explain --target: {target!r} is not one of the model's labels {labels}")
        if self.problem_type == "single_label_classification":
            probabilities = (logits[0] / self.temperature).softmax(-1).tolist()
            prediction = {"label": labels[predicted], "probabilities": dict(zip(labels, probabilities, strict=True))}
        else:
            prediction = {"logits": dict(zip(labels, logits[0].tolist(), strict=True))}
        return prediction, [AttributionTarget(f"{labels[index]} (logit)", lambda out: out[:, index], [0])]

    def card_training_facts(self) -> dict[str, Any]:
        if not self.is_temperature_scaled:
            return {}
        return {"temperature": f"{float(self.temperature):.4f} (fitted on validation; divide the logits by it: "
                               f"{CALIBRATION_FILE})"}
