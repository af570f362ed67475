"""Token attributions for classifiers and taggers: integrated gradients on the embedding output, attention rollout.

    explanation = explain(model, tokenizer, "the food was great")   # a SequenceClassifier / TokenClassifier
    explanation.save("runs/explanations")                          # explanation.html + explanation.json

Integrated gradients (Sundararajan et al., 2017) through captum's ``LayerIntegratedGradients`` on the output of the
input-embedding layer, from a baseline where every non-special token is the padding token: each token's score is
the attribution summed over the hidden size, and the scores add up to ``F(input) − F(baseline)`` (completeness; the
gap is reported as ``convergence_delta``). ``F`` is the target's logit: the predicted (or requested) class, or for a
tagger the sum of the predicted tags' logits over an entity's words. Attention rollout (Abnar & Zuidema, 2020)
multiplies the head-averaged attention maps, each mixed half-and-half with the identity for the residual stream,
and reads the rows of the explained positions (``[CLS]`` for a classifier, the entity's sub-tokens for a tagger).
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from lightning_peft.errors import LightningPeftError
from lightning_peft.export import atomic_file
from lightning_peft.types import ExplainableTask

INTEGRATED_GRADIENTS = "integrated_gradients"
ATTENTION_ROLLOUT = "attention_rollout"
METHODS = (INTEGRATED_GRADIENTS, ATTENTION_ROLLOUT)
HTML_FILE, JSON_FILE = "explanation.html", "explanation.json"



@dataclass
class Attribution:
    """One explained decision: ``target`` names it; ``scores`` holds one value per token for each method."""

    target: str
    scores: dict[str, list[float]]
    convergence_delta: float | None = None
    entity: dict[str, Any] | None = None


@dataclass
class Explanation:
    """The attributions of one input; :meth:`save` writes them as a self-contained HTML page and as JSON."""

    text: str
    tokens: list[str]
    prediction: dict[str, Any]
    attributions: list[Attribution] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_html(self) -> str:
        blocks = []
        for attribution in self.attributions:
            rows = "".join(
                f"<tr><th>{html.escape(method.replace('_', ' '))}</th>"
                f"<td>{_coloured_tokens(self.tokens, scores, signed=method == INTEGRATED_GRADIENTS)}</td>"
                "</tr>"
                for method, scores in attribution.scores.items()
            )
            delta = attribution.convergence_delta
            note = f"<p class=note>IG convergence delta: {delta:.2e}</p>" if delta is not None else ""
            blocks.append(f"<h2>{html.escape(attribution.target)}</h2><table>{rows}</table>{note}")
        prediction = html.escape(json.dumps(self.prediction, ensure_ascii=False))
        return (
            "<!DOCTYPE html><html><head><meta charset='utf-8'><title>lightning-peft explanation</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:70em}th{text-align:left;padding-right:1em;"
            "vertical-align:top;font-weight:normal;color:#555}td{line-height:2em}"
            "span.t{padding:2px 3px;margin:1px;border-radius:3px}.note{color:#777;font-size:small}</style></head>"
            f"<body><h1>{html.escape(self.text)}</h1><p>prediction: <code>{prediction}</code></p>"
            "<p class=note>green: pushes towards the target, red: against it (integrated gradients); blue: "
            "attention rollout. Intensity is relative to the largest magnitude in the row.</p>"
            f"{''.join(blocks)}</body></html>\n"
        )

    def save(self, directory: str | Path) -> tuple[Path, Path]:
        """Write ``explanation.html`` and ``explanation.json`` in ``directory`` (each through a temporary file)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = directory / HTML_FILE, directory / JSON_FILE
        contents = self.to_html(), json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        for path, content in zip(paths, contents, strict=True):
            with atomic_file(path) as tmp:
                tmp.write_text(content, encoding="utf-8")
        return paths


def _coloured_tokens(tokens: Sequence[str], scores: Sequence[float], signed: bool) -> str:
    """Tokens as spans shaded by ``|score|``: green / red by sign when ``signed``, else blue (a relevance)."""
    scale = max((abs(s) for s in scores), default=0.0) or 1.0
    spans = []
    for token, score in zip(tokens, scores, strict=True):
        alpha = abs(score) / scale
        rgb = ("0,150,60" if score >= 0 else "210,40,40") if signed else "40,90,220"
        spans.append(
            f"<span class=t style='background:rgba({rgb},{alpha:.3f})' title='{score:.4g}'>{html.escape(token)}</span>"
        )
    return " ".join(spans)


# -- the explanation ----------------------------------------------------------------------------------------
def explain(
    module: ExplainableTask,
    tokenizer: Any,
    text: str,
    methods: Sequence[str] = METHODS,
    target: str | None = None,
    n_steps: int = 50,
    max_length: int = 512,
) -> Explanation:
    """Attributions of ``module``'s decision on ``text``: the task tokenizes it and names the decisions to explain
    (``explanation_encoding`` / ``attribution_targets``: a classifier's label, one attribution per entity a tagger
    predicts, its input split into words on whitespace).

    Args:
        methods: any of ``integrated_gradients`` (needs ``captum``) and ``attention_rollout``.
        target: a classifier's label to explain (default: the predicted one).
        n_steps: integration steps of integrated gradients.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise LightningPeftError(f"explain --methods: choose from {list(METHODS)}, got {list(methods)}")
    if n_steps < 1:
        raise LightningPeftError(f"explain --n_steps: must be a positive integer, got {n_steps}")
    if not text.strip():
        raise LightningPeftError("explain --input: the text is empty")
    encoding = module.explanation_encoding(tokenizer, text, max_length)  # refuses a task without attributions
    embeddings = module.input_embeddings("explain")
    module.eval()
    batch = {k: v.to(module.device) for k, v in encoding.items() if k in module.sequence_keys}
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    with torch.no_grad():
        logits = module(batch).float()
    prediction, targets = module.attribution_targets(logits, encoding, text, target)
    explanation = Explanation(text=text, tokens=tokens, prediction=prediction)
    for name, target_function, rows, entity in targets:
        scores: dict[str, list[float]] = {}
        delta = None
        if INTEGRATED_GRADIENTS in methods:
            scores[INTEGRATED_GRADIENTS], delta = integrated_gradients(
                module, embeddings, tokenizer, batch, target_function, n_steps
            )
        if ATTENTION_ROLLOUT in methods:
            scores[ATTENTION_ROLLOUT] = attention_rollout(module, batch, rows)
        explanation.attributions.append(Attribution(name, scores, delta, entity))
    return explanation


def integrated_gradients(
    module: ExplainableTask, embeddings: torch.nn.Module, tokenizer: Any, batch: dict[str, torch.Tensor],
    target_function: Callable[[torch.Tensor], torch.Tensor], n_steps: int,
) -> tuple[list[float], float]:
    """Per-token integrated gradients of ``target_function(logits)`` on the embedding output, and the convergence
    delta (sum of attributions minus the difference of the target between input and baseline)."""
    try:
        from captum.attr import LayerIntegratedGradients
    except ImportError as err:
        raise LightningPeftError(
            "explain: integrated gradients need captum (pip install 'lightning-peft[explain]'); "
            "or use --methods [attention_rollout]"
        ) from err
    input_ids = batch["input_ids"]
    others = [k for k in module.sequence_keys if k in batch and k != "input_ids"]

    def forward(ids: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        return target_function(module({"input_ids": ids, **dict(zip(others, extra, strict=True))}).float())

    special = torch.tensor(
        tokenizer.get_special_tokens_mask(input_ids[0].tolist(), already_has_special_tokens=True), dtype=torch.bool
    ).to(input_ids.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    baseline = torch.where(special, input_ids[0], torch.full_like(input_ids[0], pad)).unsqueeze(0)
    attributions, delta = LayerIntegratedGradients(forward, embeddings).attribute(
        input_ids, baselines=baseline, additional_forward_args=tuple(batch[k] for k in others), n_steps=n_steps,
        return_convergence_delta=True,
    )
    return attributions.sum(-1)[0].tolist(), float(delta.reshape(-1)[0])


def attention_rollout(module: ExplainableTask, batch: dict[str, torch.Tensor], rows: list[int]) -> list[float]:
    """Attention rollout relevance of every token for the explained positions ``rows`` (mean of their rows)."""
    base = module.model.get_base_model() if isinstance(module.model, PeftModel) else module.model
    previous = base.config._attn_implementation
    base.set_attn_implementation("eager")  # fused attention kernels do not return the attention weights
    try:
        with torch.no_grad():
            attentions = module.model(**batch, output_attentions=True).attentions
    finally:
        base.set_attn_implementation(previous)
    if not attentions:
        raise LightningPeftError(f"explain: {type(base).__name__} returns no attention weights for attention rollout")
    size = attentions[0].shape[-1]
    rollout = torch.eye(size, device=attentions[0].device)
    for layer in attentions:
        mixed = 0.5 * layer[0].float().mean(0) + 0.5 * torch.eye(size, device=layer.device)
        rollout = (mixed / mixed.sum(-1, keepdim=True)) @ rollout
    length = batch["input_ids"].shape[1]
    rollout = rollout[-length:, -length:]  # prompt tuning & co. prepend virtual tokens
    return rollout[rows].mean(0).tolist()
