"""``PeftModule``: what every task shares — backbone, loss, metrics, training and evaluation steps."""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from peft import AdaLoraConfig, PeftConfig, TaskType, get_peft_config
from torchmetrics import MetricCollection
from transformers import AutoModel, get_scheduler

from lightning_peft.adapter_checkpoint import (
    adapter_only_checkpoint,
    check_and_restore,
    plain_hyperparameters,
    validation_metrics,
)
from lightning_peft.backbone import BackboneConfig, count_parameters, load_backbone, new_weights, position_limit
from lightning_peft.batching import BatchingStrategy, choose_batching
from lightning_peft.errors import LightningPeftError
from lightning_peft.export import export_task, initial_adapter_state
from lightning_peft.learning_rate_search import RULE, LearningRateSearch
from lightning_peft.regularization import Regularization, squared_l2, symmetric_kl
from lightning_peft.training import TrainingConfig, as_training_config, explicit_optimizer_lr, method_name
from lightning_peft.types import IGNORE_INDEX, AttributionTarget, Batch, LossTerm

LABELS_FILE = "labels.json"
FOUND_LEARNING_RATE_KEY = "found_learning_rate"  # checkpoint entry: the rate training.lr: auto found (or None)


def label_config(labels: list[str]) -> dict[str, Any]:
    """The HF config keys for a head over ``labels``: ``num_labels``, ``id2label``, ``label2id``."""
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def as_backbone_config(value: BackboneConfig | dict[str, Any]) -> BackboneConfig:
    return BackboneConfig(**value) if isinstance(value, dict) else value


def as_peft_config(value: PeftConfig | dict[str, Any] | None) -> PeftConfig | None:
    return get_peft_config(value) if isinstance(value, dict) else value


def packing_blockers(callbacks: list[Any]) -> list[str]:
    """The names of the ``callbacks`` that declare ``supports_sequence_packing = False``."""
    return [type(c).__name__ for c in callbacks if getattr(c, "supports_sequence_packing", True) is False]


class PeftModule(LightningModule, ABC):
    """Base task: a (PEFT-wrapped) transformer, its loss and metrics, trained with AdamW and a schedule.

    Subclasses set ``auto_model_class`` and ``peft_task_type``, call :meth:`build_backbone` in their ``__init__``,
    and implement :meth:`forward` (batch → logits), :meth:`compute_loss`, :meth:`build_metrics` and
    :meth:`update_metrics`. Metrics are logged as ``val/<name>`` and ``test/<name>``. How a training batch is
    computed is a :mod:`~lightning_peft.batching` strategy; checkpoints keep only the adapter
    (:mod:`~lightning_peft.adapter_checkpoint`); exports are :func:`~lightning_peft.export.export_task`'s job.

    Args:
        backbone: where the transformer comes from (see :class:`BackboneConfig`).
        peft: any ``peft.PeftConfig`` (LoRA, AdaLoRA, IA3, prefix tuning, …); ``None`` fine-tunes everything.
        optimizer: optimizer factory called with parameter groups and the learning rate of ``training.lr``; biases
            and norm weights get no weight decay.
        training: learning rate and schedule, batching, regularisation (see :class:`TrainingConfig`).

    Example::

        class Scorer(PeftModule):
            auto_model_class = AutoModelForSequenceClassification
            peft_task_type = TaskType.SEQ_CLS

            def __init__(self, backbone: BackboneConfig, peft: PeftConfig | None = None) -> None:
                super().__init__(backbone, peft)
                self.build_backbone(num_labels=1)

            # forward, compute_loss, build_metrics, update_metrics: see SequenceClassifier
    """

    auto_model_class: ClassVar[type] = AutoModel
    peft_task_type: ClassVar[TaskType | None] = None
    #: the Hub's pipeline tag for exports (model cards index their metrics under it); ``None``: not indexed
    pipeline_tag: ClassVar[str | None] = None
    #: whether training batches may be computed as packed rows (``training.sequence_packing``): the per-example
    #: outputs must come from one module whose output can be unpacked (an encoder), which seq2seq decoders are not
    supports_sequence_packing: ClassVar[bool] = True
    #: how packed rows are told apart: ``False``, an encoder's block-diagonal mask and unpacked output; ``True``, a
    #: decoder's restarting position ids (transformers builds the per-example causal masks itself)
    packs_by_position_ids: ClassVar[bool] = False
    #: constructor arguments that only steer inference (e.g. MC dropout): left out of checkpoints, because
    #: LightningCLI lets a checkpoint's hyper-parameters override the command line of ``test`` / ``predict``
    inference_arguments: ClassVar[tuple[str, ...]] = ()
    #: batch entries whose second dimension is the (right-padded) sequence, trimmed with it in micro-batches
    sequence_keys: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "token_type_ids")
    #: whether ``export --quantize`` / ``--onnx`` apply: encoder tasks whose model returns logits
    compressed_export: ClassVar[bool] = False
    #: batch entries passed to the transformer by :meth:`model_inputs`
    model_input_keys: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "token_type_ids", "position_ids")

    @classmethod
    def checkpoint_metric(cls, init_args: dict[str, Any]) -> tuple[str, str]:
        """The validation metric, and ``min`` or ``max``, that picks the best checkpoint when the CLI's
        ``checkpoint.monitor`` is ``auto`` (its default); ``init_args`` are the task's configured arguments."""
        return "val/loss", "min"

    def __init__(
        self,
        backbone: BackboneConfig,
        peft: PeftConfig | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        training: TrainingConfig | None = None,
    ) -> None:
        super().__init__()
        backbone, peft, training = as_backbone_config(backbone), as_peft_config(peft), as_training_config(training)
        given = explicit_optimizer_lr(optimizer)
        if given is not None:
            raise LightningPeftError(
                f"model.init_args.optimizer.init_args.lr: the learning rate is set by model.init_args.training.lr "
                f"(null: the PEFT method's default); move lr: {given} there"
            )
        self.save_hyperparameters()
        self.backbone_config = backbone
        self.peft_config = peft
        self.optimizer_factory = optimizer
        self.training_config = training
        #: how training batches are computed in this fit (packed rows, micro-batches…), chosen on its first batch
        self.batching: BatchingStrategy | None = None
        #: the names of this fit's callbacks that declare ``supports_sequence_packing = False`` (set at setup)
        self.fit_packing_blockers: list[str] | None = None
        #: the rate a range test picked for ``training.lr: auto`` (kept in checkpoints, so a resumed fit reuses it)
        self.found_learning_rate: float | None = None
        # Checkpoints hold only the trainable weights; the frozen base is rebuilt from the backbone config.
        self.strict_loading = False
        #: terms added to every training loss, by name (callbacks register them, e.g. AdaLoRA's orthogonality or
        #: adversarial training, and the L2 regulariser); each is called with the batch and the task loss
        self.loss_terms: dict[str, LossTerm] = {}
        if self.regularization.trainable_l2:
            weight = self.regularization.trainable_l2
            self.loss_terms["trainable_l2"] = lambda *_: weight * squared_l2(self.parameters())

    # -- construction ---------------------------------------------------------------------------------
    def build_backbone(self, **model_kwargs: Any) -> None:
        """Load the backbone into ``self.model`` and the metric collections; call once from ``__init__``."""
        self.model = load_backbone(
            self.backbone_config, self.auto_model_class, self.peft_config, self.peft_task_type, **model_kwargs
        )
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps the modes it finds at fit start
        self._new_weights = new_weights(self.model)
        #: PiSSA / OLoRA / CorDA adapters as initialised, to export a plain LoRA adapter (not saved in checkpoints:
        #: these initialisations are recomputed identically from the base weights when the model is rebuilt)
        self.initial_adapter_state = initial_adapter_state(self.model)
        metrics = self.build_metrics()
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    @abstractmethod
    def build_metrics(self) -> MetricCollection:
        """The task's metrics (cloned as ``val/`` and ``test/``)."""

    def untrained_weights(self) -> list[str]:
        """Weights that no pretrained checkpoint supplied (a new head, …) and that this module will use as they are:
        the CLI refuses to evaluate or predict with them unless a checkpoint is given or the user insists."""
        return list(self._new_weights)

    # -- steps ----------------------------------------------------------------------------------------
    @abstractmethod
    def forward(self, batch: Batch) -> torch.Tensor:
        """Batch → logits (per example, or per token)."""

    @abstractmethod
    def compute_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The task loss of ``logits``, averaged over :meth:`loss_weight`'s units."""

    @abstractmethod
    def update_metrics(self, metrics: MetricCollection, logits: torch.Tensor, batch: Batch) -> None:
        """Add a batch's predictions to ``metrics``."""

    def input_embeddings(self, owner: str) -> torch.nn.Module:
        """The model's input-embedding layer (``get_input_embeddings()``), or a clear error naming ``owner`` (the
        feature that needs it: adversarial training, attributions)."""
        getter = getattr(self.model, "get_input_embeddings", None)
        try:
            embeddings = getter() if getter is not None else None
        except NotImplementedError:
            embeddings = None
        if not isinstance(embeddings, torch.nn.Module):
            raise LightningPeftError(
                f"{owner}: {type(self.model).__name__} gives no access to its input embeddings "
                "(get_input_embeddings()); it needs a transformers model with an embedding layer"
            )
        return embeddings

    def input_embedding_layers(self, owner: str) -> list[torch.nn.Module]:
        """:meth:`input_embeddings` and every embedding layer tied to it: T5's encoder and decoder each call their
        own ``embed_tokens`` module, which shares the weight of ``shared`` (what ``get_input_embeddings()`` gives)."""
        embeddings = self.input_embeddings(owner)
        weight = getattr(embeddings, "weight", None)
        tied = [m for m in self.model.modules() if m is not embeddings and weight is not None
                and isinstance(m, torch.nn.Embedding) and m.weight is weight]
        return [embeddings, *tied]

    # -- explanations (lightning_peft.explain) ----------------------------------------------------------
    def explanation_encoding(self, tokenizer: Any, text: str, max_length: int) -> Any:
        """``text`` tokenized as a batch of one for ``explain``; a task without attributions refuses here."""
        raise self._no_attributions()

    def attribution_targets(self, logits: torch.Tensor, encoding: Any, text: str,
                            target: str | None) -> tuple[dict[str, Any], list[AttributionTarget]]:
        """The prediction on ``text`` (``logits`` of ``encoding``) and the decisions ``explain`` attributes; ``target``
        names one (a label), where the task allows it."""
        raise self._no_attributions()

    def _no_attributions(self) -> LightningPeftError:
        return LightningPeftError(
            f"explain: {type(self).__name__} does not name the decisions to attribute (attributions are implemented "
            "for SequenceClassifier and TokenClassifier; a task adds them with explanation_encoding and "
            "attribution_targets)"
        )

    @staticmethod
    def batch_size_of(batch: Batch) -> int:
        return int(batch["input_ids"].shape[0])

    def loss_weight(self, batch: Batch) -> int:
        """How many units :meth:`compute_loss` averages over (examples here; labelled tokens for taggers)."""
        return self.batch_size_of(batch)

    def model_inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {key: value for key, value in batch.items() if key in self.model_input_keys}

    def batch_loss(self, batch: Batch) -> torch.Tensor:
        """The training batch's task loss, computed the fit's way (:attr:`batching`, chosen on its first batch)."""
        if self.batching is None:
            self.batching = choose_batching(self, batch, self.packing_blocker())
        return self.batching.loss(self, batch)

    def packing_blocker(self) -> str | None:
        """Why this fit cannot train on packed rows whatever the model (the task, or a callback of the fit that
        declares ``supports_sequence_packing = False``), or ``None``."""
        if not self.supports_sequence_packing:
            return f"{type(self).__name__} does not support them"
        blocking = self.fit_packing_blockers
        if blocking is None:
            blocking = packing_blockers(self.trainer.callbacks if self._trainer is not None else [])
        return f"{', '.join(blocking)} cannot work with packed rows" if blocking else None

    def setup(self, stage: str) -> None:
        """Refuse to fit an ONNX backbone, or AdaLoRA without a callback that allocates its ranks, before any
        fit-start hook (a learning-rate range test) would train it; note which of the fit's callbacks cannot work with
        packed rows (:attr:`fit_packing_blockers`): a range test at fit start runs with Lightning's finder as the
        trainer's only callback, and must batch as the fit will. In every stage, refuse inputs longer than the
        model's position embeddings cover (:meth:`check_lengths_fit_positions`)."""
        self.check_lengths_fit_positions()
        if stage != "fit":
            return
        if self.backbone_config.onnx_file:
            raise LightningPeftError(
                "backbone.onnx_file: an ONNX model runs inference only (validate, test, predict); fit from the "
                "transformers model (pretrained_model_name_or_path of the base, or an export's merged/)"
            )
        if isinstance(self.peft_config, AdaLoraConfig) and not any(
                getattr(callback, "allocates_adalora_ranks", False) for callback in self.trainer.callbacks):
            raise LightningPeftError(
                "model.peft: AdaLoRA reallocates its ranks through the AdaLoRAScheduler callback, which this fit's "
                "trainer does not list (without it the adapter trains as a fixed-rank LoRA); add `trainer.callbacks+: "
                "[{class_path: lightning_peft.callbacks.AdaLoRAScheduler}]` (configs/peft/adalora.yaml has it)"
            )
        self.fit_packing_blockers = packing_blockers(self.trainer.callbacks)

    def check_lengths_fit_positions(self) -> None:
        """Refuse a datamodule ``max_length`` (or ``max_target_length``) beyond the model's absolute position table
        (BERT: 512), less the virtual tokens a prompt method prepends: the first long row would fail in the
        embedding lookup, mid-run."""
        datamodule = getattr(getattr(self, "_trainer", None), "datamodule", None)
        limit = position_limit(self.model)
        if limit is None or datamodule is None:
            return
        prompt = self.peft_config.num_virtual_tokens if self.peft_config and self.peft_config.is_prompt_learning else 0
        for option, virtual in (("max_length", prompt), ("max_target_length", 0)):  # prompts go before the input
            length = getattr(datamodule, option, None)
            if isinstance(length, int) and length + virtual > limit:
                added = f" + {virtual} virtual tokens" if virtual else ""
                raise LightningPeftError(
                    f"data.{option}: {length}{added} is more than the {limit} positions the model's position "
                    f"embeddings cover; set data.init_args.{option} to at most {limit - virtual}"
                )

    def training_loss(self, batch: Batch) -> torch.Tensor:
        """The task loss of one (micro-)batch in training; with R-Drop, the mean loss of two dropout passes (one
        forward over the doubled batch) plus ``rdrop_alpha`` times their symmetric KL divergence."""
        alpha = self.regularization.rdrop_alpha
        if not alpha:
            return self.compute_loss(self(batch), batch)
        doubled = {key: torch.cat([value, value]) if isinstance(value, torch.Tensor) else value
                   for key, value in batch.items()}
        logits_a, logits_b = self(doubled).chunk(2)
        loss = (self.compute_loss(logits_a, batch) + self.compute_loss(logits_b, batch)) / 2
        return loss + alpha * self.rdrop_divergence(logits_a, logits_b, batch)

    def rdrop_divergence(self, logits_a: torch.Tensor, logits_b: torch.Tensor, batch: Batch) -> torch.Tensor:
        """R-Drop's consistency term between two passes' logits: the symmetric KL of the class distributions, per
        example, or per labelled position for sequence outputs (``labels`` ≠ -100)."""
        mask = batch["labels"] != IGNORE_INDEX if logits_a.dim() == 3 else None
        return symmetric_kl(logits_a, logits_b, mask)

    @property
    def regularization(self) -> Regularization:
        """The training loss's regularisers (``training.regularization``)."""
        return self.training_config.regularization

    @property
    def label_smoothing(self) -> float:
        """The label smoothing of the task's cross-entropy: the configured one in training, none in evaluation."""
        return self.regularization.label_smoothing if self.training else 0.0

    def micro_batch(self, batch: Batch, rows: torch.Tensor, width: int) -> Batch:
        """The tensors of ``batch`` at ``rows``, with the :attr:`sequence_keys` cut to ``width`` positions."""
        return {
            key: value[rows, :width] if key in self.sequence_keys else value[rows]
            for key, value in batch.items()
            if isinstance(value, torch.Tensor)
        }

    @staticmethod
    def token_mask(batch: Batch) -> torch.Tensor:
        """Which positions of each example are real tokens (examples × positions), also in packed training, where
        ``attention_mask`` is the packed rows' attention mask; what a custom head pools with."""
        return batch.get("token_mask", batch["attention_mask"])

    def prepare_batch(self, batch: Batch) -> Batch:
        """Adjust a training or evaluation batch before the loss (e.g. drop a leading label token); as is here."""
        return batch

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """The task loss plus every registered :attr:`loss_terms` (each also logged as ``train/<name>``)."""
        batch = self.prepare_batch(batch)
        task_loss = self.batch_loss(batch)
        size = self.batch_size_of(batch)
        self.log("train/loss", task_loss, prog_bar=True, batch_size=size)
        loss = task_loss
        for name, term in self.loss_terms.items():
            value = term(batch, task_loss)
            self.log(f"train/{name}", value, batch_size=size)
            loss = loss + value
        return loss

    def _evaluation_step(self, batch: Batch, stage: str,
                         metrics: MetricCollection | None) -> tuple[torch.Tensor, Batch]:
        """Log the batch's loss as ``<stage>/loss`` and, unless ``metrics`` is ``None``, update the metrics; return
        the logits and the batch as :meth:`prepare_batch` made it."""
        batch = self.prepare_batch(batch)
        logits = self(batch)
        loss = self.compute_loss(logits, batch)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=self.batch_size_of(batch), sync_dist=True)
        if metrics is not None:
            self.update_metrics(metrics, logits, batch)
        return logits, batch

    def _log_epoch_metrics(self, metrics: MetricCollection, prog_bar: bool) -> None:
        # compute() syncs the metric states across processes; metrics may return dicts (e.g. per-type F1)
        self.log_dict(metrics.compute(), prog_bar=prog_bar)
        with torch.inference_mode(False):  # states made under inference mode (validate) could not be updated in place
            metrics.reset()  # later outside it (fit's validation runs under no_grad)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluation_step(batch, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics(self.val_metrics, prog_bar=True)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluation_step(batch, "test", self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics(self.test_metrics, prog_bar=False)

    # -- optimisation ---------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 else decay).append(param)
        groups = [{"params": decay}] + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])
        try:
            optimizer = self.optimizer_factory(groups, lr=self.learning_rate)
        except (TypeError, ValueError) as err:  # torch's own checks: "Invalid learning rate: -0.1", …
            raise LightningPeftError(f"model.init_args.optimizer: {err}") from err
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = get_scheduler(
            self.training_config.lr_scheduler_type,
            optimizer,
            num_warmup_steps=math.ceil(self.training_config.warmup_ratio * total_steps),
            num_training_steps=total_steps,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @property
    def learning_rate(self) -> float:
        """The peak learning rate: ``training.lr``, the PEFT method's default when that is ``null``, or the rate the
        range test found when it is ``auto``."""
        if self.found_learning_rate is not None:
            return self.found_learning_rate
        return self.training_config.learning_rate(self.peft_config)

    @property
    def searches_learning_rate(self) -> bool:
        """``training.lr: auto``: :class:`~lightning_peft.callbacks.LearningRateSearch` picks the rate before fit."""
        return self.training_config.searches_learning_rate

    def learning_rate_source(self) -> str:
        """Where :attr:`learning_rate` comes from, as the fit's log and the model card say it."""
        if self.found_learning_rate is not None:
            return f"training.lr: auto, found by a learning-rate range test: {RULE}"
        if self.training_config.uses_method_default:
            return (f"the default for {method_name(self.peft_config)}; set model.init_args.training.lr to a number or "
                    "auto to change it")
        return "model.init_args.training.lr"

    def configure_callbacks(self) -> list[Callback]:
        """:class:`~lightning_peft.callbacks.LearningRateSearch` for ``training.lr: auto``, unless the trainer has
        one (with the user's settings)."""
        if not self.searches_learning_rate or any(isinstance(c, LearningRateSearch) for c in self.trainer.callbacks):
            return []
        return [LearningRateSearch()]

    def resolved_training_options(self) -> dict[str, Any]:
        """:attr:`training_config` as plain data, with the learning rate actually used."""
        return {**self.training_config.as_dict(), "lr": self.learning_rate}

    def on_fit_start(self) -> None:
        self.batching = None  # chosen again: this fit's callbacks may differ
        trainable, total = count_parameters(self)
        rank_zero_info(
            f"trainable params: {trainable:,} || all params: {total:,} || trainable: {100 * trainable / total:.4f}%"
        )
        rank_zero_info(f"learning rate: {self.learning_rate:g} ({self.learning_rate_source()})")

    # -- adapter-only checkpoints ---------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep plain hyper-parameters (with the learning rate used), the trainable weights, the rank pattern and the
        latest ``val/`` metrics (see :mod:`lightning_peft.adapter_checkpoint`)."""
        hparams = plain_hyperparameters(checkpoint.get("hyper_parameters", {}))
        if isinstance(hparams.get("backbone"), dict):  # running remote code is the loader's own decision
            hparams["backbone"] = {**hparams["backbone"], "trust_remote_code": False}
        hparams["training"] = self.resolved_training_options()
        checkpoint["hyper_parameters"] = {k: v for k, v in hparams.items() if k not in self.inference_arguments}
        metrics = validation_metrics(self.trainer.callback_metrics) if self._trainer is not None else None
        adapter_only_checkpoint(self, checkpoint, metrics, keep_base=not self.backbone_config.is_pretrained)
        checkpoint[FOUND_LEARNING_RATE_KEY] = self.found_learning_rate

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose weights do not fit this model; restore AdaLoRA's rank pattern and the rate a
        ``training.lr: auto`` search found for it (a resumed fit does not search again; an export's card states it
        whatever this config's ``lr`` says)."""
        check_and_restore(self, checkpoint)
        if checkpoint.get(FOUND_LEARNING_RATE_KEY) is not None:  # also where this config's lr is not auto: the
            self.found_learning_rate = float(checkpoint[FOUND_LEARNING_RATE_KEY])  # weights trained with it

    # -- export ---------------------------------------------------------------------------------------
    def model_config_kwargs(self) -> dict[str, Any]:
        """Config keys a loader must pass to ``from_pretrained`` to rebuild the head (labels, problem type)."""
        return {}

    def export(self, directory: str | Path, tokenizer: Any | None = None, merge: bool = False,
               **facts: Any) -> Path:
        """Write the model in Hugging Face formats, atomically (see :func:`lightning_peft.export.export_task`, which
        takes the model card's ``metrics``, ``data`` and ``training`` facts, ``overwrite`` and ``field``)."""
        return export_task(self, directory, tokenizer, merge, **facts)

    def save_extras(self, directory: Path) -> None:
        """Files :meth:`export` writes beside the model: ``labels.json`` with :meth:`model_config_kwargs`."""
        (directory / LABELS_FILE).write_text(json.dumps(self.model_config_kwargs(), indent=2) + "\n")

    def loading_snippet(self, adapter_dir: Path) -> str:
        """Two lines of Python that load the exported adapter with plain peft."""
        auto = "AutoPeftModel" + self.auto_model_class.__name__.removeprefix("AutoModel")
        kwargs = "".join(f", {key}={value!r}" for key, value in self.model_config_kwargs().items())
        return f"from peft import {auto}\nmodel = {auto}.from_pretrained({str(adapter_dir)!r}{kwargs})"

    def merged_loading_snippet(self, merged_dir: Path) -> str:
        """Two lines of Python that load the exported full model with plain transformers."""
        auto = self.auto_model_class.__name__
        return f"from transformers import {auto}\nmodel = {auto}.from_pretrained({str(merged_dir)!r})"

    def card_training_facts(self) -> dict[str, Any]:
        """Facts of this task that the model card adds to its training section (e.g. a fitted temperature)."""
        return {}
