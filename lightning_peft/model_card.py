"""The model card (``README.md``) written with every export: what was trained, how, on what, how well, how to load."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCardData
from huggingface_hub import ModelCard as HubModelCard
from peft import PeftConfig, PeftModel

from lightning_peft.adapter_checkpoint import plain_hyperparameters
from lightning_peft.backbone import count_parameters
from lightning_peft.quantization import quantization_note
from lightning_peft.training import optimizer_summary

if TYPE_CHECKING:
    from lightning_peft.tasks.base import PeftModule

#: peft config fields that are bookkeeping, not hyper-parameters
_PEFT_BOOKKEEPING = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
                     "auto_mapping", "rank_pattern"}
#: fields stated even at their default value: what a reader asks first about a method
_PEFT_CORE = {"r", "lora_alpha", "target_modules", "init_r", "target_r", "num_virtual_tokens"}


@dataclass
class ModelCard:
    """The facts a model card states; :meth:`render` turns them into Markdown with Hub metadata: YAML front matter
    from ``huggingface_hub``'s ``ModelCardData`` (library, base model, tags, pipeline tag, and the metrics as a
    ``model-index`` the Hub shows), then the tables.

    Example::

        card = ModelCard(title="SST-2 sentiment (LoRA)", base_model="bert-base-uncased", task="SequenceClassifier",
                         metrics={"val/accuracy": 0.91}, loading="from peft import …\\nmodel = …")
        (export_dir / "README.md").write_text(card.render())
    """

    title: str
    base_model: str | None
    task: str
    peft_method: str = "full fine-tuning"
    peft_hyperparameters: dict[str, Any] = field(default_factory=dict)
    parameters: str = ""
    #: how the base was quantised while the adapter trained on it (empty: full precision)
    base_quantization: str = ""
    labels: list[str] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    loading: str = ""
    merged: str = ""
    tags: list[str] = field(default_factory=list)
    pipeline_tag: str | None = None
    #: the validation data the metrics were measured on, as the model index names it
    dataset: str = "validation split"

    def card_data(self) -> ModelCardData:
        """The front matter: what the Hub indexes."""
        results = [
            EvalResult(task_type=self.pipeline_tag, dataset_type=self.dataset, dataset_name=self.dataset,
                       dataset_split="validation", metric_type=name.removeprefix("val/"), metric_name=name,
                       metric_value=round(float(value), 6))
            for name, value in self.metrics.items()
        ] if self.pipeline_tag else []
        return ModelCardData(
            library_name="transformers" if self.peft_method == "full fine-tuning" else "peft",
            base_model=self.base_model or None,
            tags=["lightning-peft", *self.tags],
            pipeline_tag=self.pipeline_tag,
            model_name=self.title if results else None,
            eval_results=results or None,
        )

    def render(self) -> str:
        model = {"base model": self.base_model or "randomly initialised (config only)", "task": self.task,
                 "PEFT method": self.peft_method, "parameters": self.parameters}
        if self.base_quantization:
            model["base quantisation"] = self.base_quantization
        if self.labels is not None:
            model["labels"] = ", ".join(self.labels)
        sections = [
            f"# {self.title}\n\nTrained with [lightning-peft](https://github.com/lightning-peft/lightning-peft).",
            _section("Model", model),
            _section("PEFT hyper-parameters", self.peft_hyperparameters),
            _section("Training", self.training),
            _section("Metrics", {name: f"{value:.4f}" for name, value in self.metrics.items()},
                     empty="no validation metrics were recorded for this checkpoint"),
            _section("Data", self.data),
            f"## Loading\n\n```python\n{self.loading}\n```",
        ]
        if self.merged:
            sections.append(f"## Merged model\n\n{self.merged}")
        body = "\n\n".join(s for s in sections if s)
        return str(HubModelCard(f"---\n{self.card_data().to_yaml()}\n---\n\n{body}\n"))


def _section(title: str, rows: dict[str, Any], empty: str = "") -> str:
    if not rows:
        return f"## {title}\n\n{empty}" if empty else ""
    table = "\n".join(f"| {key} | {_cell(value)} |" for key, value in rows.items())
    return f"## {title}\n\n| | |\n|---|---|\n{table}"


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def peft_hyperparameters(config: PeftConfig) -> dict[str, Any]:
    """The fields of ``config`` that differ from its class defaults (the ones someone chose), as plain data."""
    chosen = {}
    for spec in dataclasses.fields(config):
        if spec.name in _PEFT_BOOKKEEPING:
            continue
        value = getattr(config, spec.name)
        if spec.default is not dataclasses.MISSING:
            default = spec.default
        elif spec.default_factory is not dataclasses.MISSING:
            default = spec.default_factory()
        else:
            default = dataclasses.MISSING
        if value != default or spec.name in _PEFT_CORE:
            chosen[spec.name] = sorted(value) if isinstance(value, set) else value
    if getattr(config, "rank_pattern", None):
        chosen["rank_pattern"] = "final ranks per module, in adapter/adapter_config.json"
    return chosen


def task_model_card(
    task: PeftModule, loading: str, merged: str, metrics: dict[str, float], data: dict[str, Any],
    training: dict[str, Any],
) -> ModelCard:
    """The model card of ``task``'s export: its method, parameters, labels, training options (with the learning rate
    used and the task's :meth:`~lightning_peft.tasks.base.PeftModule.card_training_facts`), ``metrics``, ``data``
    and the ``loading`` / ``merged`` notes."""
    peft_config = task.model.active_peft_config if isinstance(task.model, PeftModel) else None
    method = peft_config.peft_type.value if peft_config else "full fine-tuning"
    trainable, total = count_parameters(task)
    hparams = plain_hyperparameters(dict(task.hparams))
    skipped = ("backbone", "peft", "labels", "training", *task.inference_arguments)
    hparams = {k: v for k, v in hparams.items() if k not in skipped and k[0] != "_"}
    hparams.update(task.resolved_training_options())
    if task.found_learning_rate is not None:
        hparams["lr"] = f"{task.learning_rate:g} ({task.learning_rate_source()})"
    hparams["optimizer"] = optimizer_summary(task.optimizer_factory, task.learning_rate)
    labels = task.model_config_kwargs().get("id2label")
    base = task.backbone_config.pretrained_model_name_or_path
    name = type(task).__name__
    return ModelCard(
        title=f"{name} ({method}) on {base or 'a randomly initialised model'}",
        base_model=base,
        task=f"{name} ({task.auto_model_class.__name__})",
        peft_method=method,
        peft_hyperparameters=peft_hyperparameters(peft_config) if peft_config else {},
        parameters=f"{trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)",
        base_quantization=quantization_note(task.backbone_config.quantization),
        labels=list(labels.values()) if labels else None,
        training={**training, **hparams, **task.card_training_facts()},
        metrics=metrics,
        data=data,
        loading=loading,
        merged=merged,
        tags=[method.lower(), name],
        pipeline_tag=task.pipeline_tag,
        dataset=str(data.get("dataset") or Path(str(data.get("validation file") or "validation split")).name),
    )
