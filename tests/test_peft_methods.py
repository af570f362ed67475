"""Every PEFT preset in configs/peft/ on every task: fit a few steps, export (with merged/), reload with plain peft
and transformers, same logits. Unsupported combinations must fail at construction with a clear message.

The outcome of each pair is collected for the README's method × task table; ``pytest --peft-matrix PATH`` writes
it as Markdown (see tests/conftest.py).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from lightning_peft import ChatDataModule, ClassificationDataModule, Seq2SeqDataModule, TokenClassificationDataModule
from lightning_peft.callbacks import AdaLoRAScheduler
from lightning_peft.errors import LightningPeftError
from tests.reload_export import reload_logits
from tests.test_export import build, reload_spec, sample_inputs

REPO = Path(__file__).resolve().parents[1]
ORDER = ["lora", "rslora", "dora", "pissa", "olora", "adalora", "ia3", "loha", "lokr", "vera", "prefix_tuning",
         "prompt_tuning", "p_tuning"]  # the README's row order; presets not listed come last
PRESETS = sorted((REPO / "configs" / "peft").glob("*.yaml"), key=lambda p: (ORDER + [p.stem]).index(p.stem))
TASKS = ("classification", "token_classification", "seq2seq", "seq2seq_t5", "causal_lm")
HEADERS = {"classification": "classification (BERT)", "token_classification": "NER (BERT)",
           "seq2seq": "seq2seq (BERT2BERT warm start)", "seq2seq_t5": "seq2seq (T5)",
           "causal_lm": "chat (Llama decoder)"}
NO_PAST_KEY_VALUES = ("does not support past key values", "BERT takes no past_key_values, which carry the prefixes")
#: (preset, task) pairs that peft cannot run: (pattern our error must match, reason for the README table)
UNSUPPORTED: dict[tuple[str, str], tuple[str, str]] = {
    ("prefix_tuning", "classification"): NO_PAST_KEY_VALUES,
    ("prefix_tuning", "token_classification"): NO_PAST_KEY_VALUES,
    ("prefix_tuning", "seq2seq"): ("warm-started EncoderDecoderModel",
                                   "prefixes do not fit a warm-started EncoderDecoderModel's attention caches"),
}
#: outcome per (preset, task), rendered into the README table by the conftest hook
MATRIX: dict[tuple[str, str], str] = {}


def preset_peft_config(path: Path):
    """The preset's ``model.init_args.peft`` built as the CLI builds it (``class_path`` + ``init_args``)."""
    spec = yaml.safe_load(path.read_text())["model"]["init_args"]["peft"]
    module, name = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**spec["init_args"])


def datamodule(task: str, tokenizer: Path, files: dict[str, Path]):
    cls = {"classification": ClassificationDataModule, "token_classification": TokenClassificationDataModule,
           "seq2seq": Seq2SeqDataModule, "seq2seq_t5": Seq2SeqDataModule, "causal_lm": ChatDataModule}[task]
    # max_length 64: the tiny BERT's 128 positions hold a row plus the prompt methods' 20 virtual tokens
    data = cls(tokenizer=str(tokenizer), train_file=str(files["train"]), batch_size=8, seed=0, max_length=64)
    data.setup("fit")
    return data


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_fits_exports_and_reloads(preset, task, tiny_bert_dir, tiny_t5_dir, tiny_llama_dir, toy_data, toy_ner,
                                         toy_pairs, toy_chat, tmp_path):
    key = (preset.stem, task)
    peft_config = preset_peft_config(preset)
    model_dir = {"seq2seq_t5": tiny_t5_dir, "causal_lm": tiny_llama_dir}.get(task, tiny_bert_dir)
    if key in UNSUPPORTED:
        pattern, reason = UNSUPPORTED[key]
        with pytest.raises(LightningPeftError, match=pattern):
            build(task, model_dir, peft_config)
        MATRIX[key] = f"not supported by peft: {reason}"
        return
    pl.seed_everything(0)
    files = {"classification": toy_data, "token_classification": toy_ner, "causal_lm": toy_chat}.get(task, toy_pairs)
    data = datamodule(task, model_dir, files)
    module = build(task, model_dir, peft_config, labels=getattr(data, "labels", None))
    callbacks = [AdaLoRAScheduler(heatmap=False)] if preset.stem == "adalora" else []
    pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0, callbacks=callbacks).fit(
        module, datamodule=data)
    export = module.export(tmp_path / "export", merge=True)
    inputs = sample_inputs(task)
    module.eval()
    with torch.no_grad():
        expected = module.model(**inputs).logits
    reloaded = reload_logits(reload_spec(module, export, inputs))
    for name, logits in reloaded.items():
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5, msg=f"{name} differs")
    merged = "merged" in reloaded
    assert merged == (not module.model.active_peft_config.is_prompt_learning)
    MATRIX[key] = "works" if merged else "works; no `merged/` (virtual tokens cannot be merged)"


def render_matrix() -> str:
    """The outcomes collected in :data:`MATRIX` as a Markdown table, one row per preset, one column per task;
    pairs that did not run (deselected, or failed before recording) show ``not run``."""
    lines = ["| preset | " + " | ".join(HEADERS[task] for task in TASKS) + " |", "|---" * (len(TASKS) + 1) + "|"]
    for preset in [p.stem for p in PRESETS if any(p.stem == name for name, _ in MATRIX)]:
        cells = [MATRIX.get((preset, task), "not run (failed)") for task in TASKS]
        lines.append(f"| `configs/peft/{preset}.yaml` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
