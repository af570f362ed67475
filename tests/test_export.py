"""Exports round-trip: the in-memory model, ``PeftModel.from_pretrained`` on ``adapter/`` and ``merged/`` loaded by
plain transformers give the same logits, in a process that never imports lightning-peft."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftConfig, PromptTuningConfig

from lightning_peft import (
    BackboneConfig,
    CausalGenerator,
    LightningPeftError,
    Seq2SeqGenerator,
    SequenceClassifier,
    TokenClassifier,
)
from lightning_peft.export import EXPORT_MARKER, CannotMerge, ExistingOutput, atomic_directory, merged_model

RELOAD_SCRIPT = Path(__file__).with_name("reload_export.py")


def build(task: str, model_dir: Path, peft: PeftConfig | None = None, labels: list[str] | None = None):
    """The task's module on the tiny model in ``model_dir``: ``seq2seq`` warm-starts a BERT2BERT from it,
    ``seq2seq_t5`` loads it as is. LoRA on query/value by default."""
    peft = peft or LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    if task == "classification":
        return SequenceClassifier(BackboneConfig(str(model_dir)), peft, labels=labels or ["neg", "pos"])
    if task == "token_classification":
        return TokenClassifier(BackboneConfig(str(model_dir)), peft, labels=labels or ["O", "B-PER", "I-PER"])
    if task == "seq2seq_t5":
        return Seq2SeqGenerator(BackboneConfig(str(model_dir)), peft)
    if task == "causal_lm":
        return CausalGenerator(BackboneConfig(str(model_dir)), peft)
    bert2bert = BackboneConfig(str(model_dir), decoder_pretrained_model_name_or_path=str(model_dir))
    return Seq2SeqGenerator(bert2bert, peft)


def reload_spec(module, export: Path, inputs) -> dict:
    """What tests/reload_export.py needs to rebuild ``module``'s export with plain transformers + peft."""
    return {"auto": module.auto_model_class.__name__, "base": module.backbone_config.pretrained_model_name_or_path,
            "config": module.model_config_kwargs(),
            "decoder": module.backbone_config.decoder_pretrained_model_name_or_path,
            "adapter": str(export / "adapter"),
            "merged": str(export / "merged") if (export / "merged").is_dir() else None, "inputs": inputs}


def sample_inputs(task: str) -> dict[str, torch.Tensor]:
    inputs = {"input_ids": torch.tensor([[2, 10, 11, 12, 3], [2, 13, 14, 3, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])}
    if task.startswith("seq2seq"):
        inputs["decoder_input_ids"] = torch.tensor([[2, 15, 16], [2, 17, 3]])
    return inputs


@pytest.mark.parametrize("task", ["classification", "token_classification", "seq2seq"])
def test_adapter_and_merged_model_reload_with_the_same_logits(task, tiny_bert_dir, tmp_path):
    torch.manual_seed(0)
    module = build(task, tiny_bert_dir).eval()
    for param in module.parameters():
        if param.requires_grad:  # a trained-looking adapter: LoRA's B starts at zero, which would merge trivially
            param.data.normal_(0.0, 0.2)
    export = module.export(tmp_path / "export", merge=True)
    inputs = sample_inputs(task)
    with torch.no_grad():
        expected = module.model(**inputs).logits
    torch.save(inputs, tmp_path / "inputs.pt")
    spec = {**reload_spec(module, export, str(tmp_path / "inputs.pt")), "out": str(tmp_path / "out.pt")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    # a fresh process, run as a script from tests/ so that neither lightning_peft nor the repository is importable
    subprocess.run([sys.executable, str(RELOAD_SCRIPT), str(tmp_path / "spec.json")], check=True, cwd=tmp_path,
                   env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    reloaded = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(reloaded["adapter"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reloaded["merged"], expected, rtol=1e-5, atol=1e-5)


def test_export_layout_and_model_card(tiny_bert_dir, tmp_path):
    module = build("classification", tiny_bert_dir)
    export = module.export(tmp_path / "export", metrics={"val/accuracy": 0.75}, data={"train file": "train.csv"},
                           training={"optimizer steps": 12})
    assert {p.name for p in export.iterdir()} == {"adapter", "README.md", EXPORT_MARKER}  # no merged/ unless asked
    assert {"adapter_config.json", "adapter_model.safetensors", "labels.json"} <= {
        p.name for p in (export / "adapter").iterdir()}
    card = (export / "README.md").read_text()
    assert card == (export / "adapter" / "README.md").read_text()  # peft's blank template replaced
    for fact in (f"base_model: {tiny_bert_dir}", "library_name: peft", "| PEFT method | LORA |", "| r | 4 |",
                 '| target_modules | ["query", "value"] |', "| val/accuracy | 0.7500 |", "| train file | train.csv |",
                 "| optimizer steps | 12 |", "| labels | neg, pos |",
                 f"AutoPeftModelForSequenceClassification.from_pretrained('{export / 'adapter'}', num_labels=2"):
        assert fact in card, fact
    from huggingface_hub import ModelCard

    front = ModelCard.load(export / "README.md").data  # the Hub's own parser reads the front matter
    assert front.library_name == "peft" and front.pipeline_tag == "text-classification"
    assert "lightning-peft" in front.tags and front.base_model == str(tiny_bert_dir)
    [result] = front.eval_results  # the metrics as a model-index
    assert (result.metric_name, result.metric_type, result.metric_value) == ("val/accuracy", "accuracy", 0.75)
    assert result.dataset_split == "validation" and result.task_type == "text-classification"


def test_methods_that_cannot_merge_say_why(tiny_bert_dir, tmp_path):
    prompt = PromptTuningConfig(num_virtual_tokens=4)
    module = SequenceClassifier(BackboneConfig(str(tiny_bert_dir)), prompt, labels=["neg", "pos"])
    with pytest.raises(CannotMerge, match="PROMPT_TUNING adds trained virtual tokens"):
        merged_model(module.model)
    with pytest.warns(UserWarning, match="no merged/"):
        export = module.export(tmp_path / "export", merge=True)
    assert not (export / "merged").exists()
    assert "Not written: PROMPT_TUNING adds trained virtual tokens" in (export / "README.md").read_text()


def test_full_fine_tuning_exports_the_full_model(tiny_bert_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    module = SequenceClassifier(BackboneConfig(str(tiny_bert_dir)), None, labels=["neg", "pos"])
    export = module.export(tmp_path / "export")
    assert {p.name for p in export.iterdir()} == {"merged", "README.md", EXPORT_MARKER}
    assert AutoModelForSequenceClassification.from_pretrained(export / "merged").config.id2label == {0: "neg", 1: "pos"}
    assert "library_name: transformers" in (export / "README.md").read_text()


def test_failed_export_leaves_the_previous_one_whole(tiny_bert_dir, tmp_path):
    module = build("classification", tiny_bert_dir)
    export = module.export(tmp_path / "export")
    before = {p.name: p.read_bytes() for p in (export / "adapter").iterdir()}

    class Broken:
        def save_pretrained(self, directory):
            (Path(directory) / "tokenizer.json").write_text("{")  # half-written, then the disk fills up
            raise OSError("No space left on device")

    with pytest.raises(LightningPeftError, match="export_dir: cannot write .*No space left on device; nothing was"):
        module.export(tmp_path / "export", tokenizer=Broken())
    assert {p.name: p.read_bytes() for p in (export / "adapter").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary directory left behind


def test_atomic_directory_replaces_whole(tmp_path):
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "old.txt").write_text("old")
    with atomic_directory(tmp_path / "out") as tmp:  # an earlier output of ours: replaced whole
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [EXPORT_MARKER, "new.txt"]


def test_atomic_directory_never_replaces_what_it_did_not_write(tmp_path):
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "thesis.tex").write_text("years of work")
    (tmp_path / "notes.txt").write_text("notes")
    for target in (tmp_path / "thesis", tmp_path / "notes.txt"):
        with pytest.raises(ExistingOutput, match="--overwrite true"), atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("new")
    assert (tmp_path / "thesis" / "thesis.tex").read_text() == "years of work"
    assert (tmp_path / "notes.txt").read_text() == "notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "thesis"]  # no temporary left
    with atomic_directory(tmp_path / "thesis", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (tmp_path / "thesis" / "new.txt").is_file() and not (tmp_path / "thesis" / "thesis.tex").exists()


def test_an_export_from_before_the_marker_is_recognised(tmp_path):
    (tmp_path / "export" / "adapter").mkdir(parents=True)
    (tmp_path / "export" / "README.md").write_text("card")
    with atomic_directory(tmp_path / "export") as tmp:
        (tmp / "README.md").write_text("new card")
    assert (tmp_path / "export" / "README.md").read_text() == "new card"


@pytest.mark.parametrize("where", ["under-a-file", "unwritable"])
def test_an_impossible_export_path_is_one_clear_error(tmp_path, where):
    (tmp_path / "file.txt").write_text("x")
    target = tmp_path / "file.txt" / "export" if where == "under-a-file" else Path("/proc/lightning-peft/export")
    with pytest.raises(LightningPeftError, match="export_dir: cannot write"), atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")


class RecordingHub:
    """Stands in for ``huggingface_hub.HfApi``: records the repo and the commit instead of uploading."""

    calls: list = []

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def create_commit(self, repo_id, operations, commit_message):
        operations = list(operations)
        for operation in operations:  # what upload would read: every file exists and is inside the export
            assert Path(operation.path_or_fileobj).is_file()
        self.calls.append(("create_commit", repo_id, sorted(op.path_in_repo for op in operations)))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


def test_push_to_hub_uploads_the_export_in_one_commit(tiny_bert_dir, tmp_path, monkeypatch):
    import lightning_peft.export as export_module

    monkeypatch.setattr(export_module, "HfApi", RecordingHub)
    RecordingHub.calls = []
    module = build("classification", tiny_bert_dir)
    export = module.export(tmp_path / "export", merge=True)
    url = export_module.push_export(export, "me/tiny-lora", private=True)
    assert url == "https://huggingface.co/me/tiny-lora/commit/abc"
    (_, repo, private, exist_ok), (_, _, paths) = RecordingHub.calls
    assert (repo, private, exist_ok) == ("me/tiny-lora", True, True)
    # the adapter at the root (AutoPeftModel loads the repo id), the merged model beside it, no marker file
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "labels.json",
            "merged/config.json", "merged/model.safetensors"} <= set(paths)
    assert not any(EXPORT_MARKER in p for p in paths)


def test_push_to_hub_failures_are_one_error_and_keep_the_export(tiny_bert_dir, tmp_path, monkeypatch):
    from lightning_peft.export import push_export

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub here: the real client refuses at once
    export = build("classification", tiny_bert_dir).export(tmp_path / "export")
    with pytest.raises(LightningPeftError, match=r"--push_to_hub: uploading .* to 'me/tiny-lora' failed .*; the export "
                                                 r"is intact on disk"):
        push_export(export, "me/tiny-lora")
    assert (export / "adapter" / "adapter_model.safetensors").is_file()
    with pytest.raises(LightningPeftError, match="is not an export"):
        push_export(tmp_path, "me/tiny-lora")


def test_cli_export_pushes_with_push_to_hub(fitted, tmp_path, monkeypatch, capsys):
    import lightning_peft.export as export_module
    from lightning_peft.cli import main

    monkeypatch.setattr(export_module, "HfApi", RecordingHub)
    RecordingHub.calls = []
    main(["export", "--config", str(fitted["config"]), "--ckpt_path", str(fitted["ckpt"] / "best.ckpt"),
          "--export_dir", str(tmp_path / "export"), "--push_to_hub", "me/toy-lora"])
    assert "pushed: https://huggingface.co/me/toy-lora/commit/abc" in capsys.readouterr().out
    assert [call[:2] for call in RecordingHub.calls] == [("create_repo", "me/toy-lora"),
                                                         ("create_commit", "me/toy-lora")]
