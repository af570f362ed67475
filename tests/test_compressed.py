"""Compressed exports (``export --quantize int8``, ``--onnx``): what they hold, that they compute what the merged
model computes, that ``predict`` runs them, and one error for what they cannot be made from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import yaml
from peft import LoraConfig, PromptTuningConfig
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

from lightning_peft import BackboneConfig, LightningPeftError, Seq2SeqGenerator, SequenceClassifier
from lightning_peft.cli import main
from lightning_peft.compressed import INT8_DIR, ONNX_DIR, ONNX_FILE, ONNX_INT8_FILE, OnnxModel
from lightning_peft.export import hub_operations
from tests.test_cli import assert_one_error, run_main

pytest.importorskip("torchao")
TEXTS = ["the food was great", "the room was awful and the staff rude", "good"]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def compressed(fitted: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fitted CLI config exported with --quantize int8 --onnx (once; tests only read it)."""
    directory = tmp_path_factory.mktemp("compressed") / "export"
    main(["export", "--config", str(fitted["config"]), "--ckpt_path", "best", "--export_dir", str(directory),
          "--quantize", "int8", "--onnx", "true"])
    return directory


def test_the_export_holds_int8_and_onnx_models_that_compute_the_merged_logits(compressed):
    tokenizer = AutoTokenizer.from_pretrained(compressed / ONNX_DIR)
    encoded = tokenizer(TEXTS, return_tensors="pt", padding=True)
    merged = AutoModelForSequenceClassification.from_pretrained(compressed / "merged").eval()
    int8 = AutoModelForSequenceClassification.from_pretrained(compressed / INT8_DIR).eval()
    assert type(int8.bert.encoder.layer[0].attention.self.query.weight).__name__ == "Int8Tensor"
    with torch.no_grad():
        reference = merged(**encoded).logits
        torch.testing.assert_close(int8(**encoded).logits, reference, atol=5e-2, rtol=0)
    for file, tolerance in ((ONNX_FILE, 1e-5), (ONNX_INT8_FILE, 5e-2)):
        session = onnxruntime.InferenceSession(str(compressed / ONNX_DIR / file))
        names = {node.name for node in session.get_inputs()}
        logits = session.run(["logits"], {k: v.numpy() for k, v in encoded.items() if k in names})[0]
        np.testing.assert_allclose(logits, reference.numpy(), atol=tolerance, rtol=0)
    sizes = {name: sum(p.stat().st_size for p in (compressed / name).glob("*.safetensors")) for name in ("merged",
                                                                                                     INT8_DIR)}
    assert sizes[INT8_DIR] < sizes["merged"]
    assert (compressed / ONNX_DIR / ONNX_INT8_FILE).stat().st_size < (compressed / ONNX_DIR / ONNX_FILE).stat().st_size
    card = (compressed / "README.md").read_text()
    assert f"{INT8_DIR}/" in card and "onnxruntime.InferenceSession" in card and "model.compile" in card
    uploaded = {operation.path_in_repo for operation in hub_operations(compressed)}
    assert {"adapter_model.safetensors", "merged/model.safetensors", "int8/model.safetensors",
            f"onnx/{ONNX_FILE}", f"onnx/{ONNX_INT8_FILE}"} <= uploaded


def test_predict_runs_the_compressed_models(compressed, fitted, tmp_path):
    config = str(fitted["config"])
    main(["predict", "--config", config, "--ckpt_path", "best", "--predictions_path", str(tmp_path / "ref.jsonl")])
    reference = records(tmp_path / "ref.jsonl")
    backbone = "--model.init_args.backbone."
    runs = {
        "onnx": [f"{backbone}pretrained_model_name_or_path", str(compressed / ONNX_DIR), f"{backbone}onnx_file",
                 ONNX_FILE],
        "onnx_int8": [f"{backbone}pretrained_model_name_or_path", str(compressed / ONNX_DIR), f"{backbone}onnx_file",
                      ONNX_INT8_FILE],
        "int8": [f"{backbone}pretrained_model_name_or_path", str(compressed / INT8_DIR)],
    }
    for name, args in runs.items():
        path = tmp_path / f"{name}.jsonl"
        main(["predict", "--config", config, *args, "--model.init_args.peft", "null", "--predictions_path", str(path)])
        got = records(path)
        assert [r["text"] for r in got] == [r["text"] for r in reference]
        for mine, theirs in zip(got, reference, strict=True):
            for label, probability in theirs["probabilities"].items():
                assert mine["probabilities"][label] == pytest.approx(probability, abs=1e-5 if name == "onnx" else 2e-2)


def test_a_tagger_exports_to_onnx_and_predicts_the_same_tags(tmp_path, tiny_bert_dir, toy_ner):
    config = {
        "seed_everything": 3,
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "enable_progress_bar": False, "logger": False,
                    "default_root_dir": str(tmp_path)},
        "checkpoint": {"dirpath": str(tmp_path / "ckpt")},
        "model": {"class_path": "lightning_peft.TokenClassifier",
                  "init_args": {"backbone": {"pretrained_model_name_or_path": str(tiny_bert_dir)},
                                "peft": {"class_path": "peft.LoraConfig",
                                         "init_args": {"r": 4, "target_modules": ["query", "value"]}}}},
        "data": {"class_path": "lightning_peft.TokenClassificationDataModule",
                 "init_args": {"train_file": str(toy_ner["train"]), "validation_file": str(toy_ner["validation"]),
                               "predict_file": str(toy_ner["predict"]), "batch_size": 16}},
    }
    path = tmp_path / "ner.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    main(["export", "--config", str(path), "--ckpt_path", "best", "--export_dir", str(tmp_path / "export"),
          "--onnx", "true"])
    merged = AutoModelForTokenClassification.from_pretrained(tmp_path / "export" / "merged").eval()
    onnx = OnnxModel(tmp_path / "export" / ONNX_DIR)
    inputs = {"input_ids": torch.randint(5, 60, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(onnx(**inputs).logits, merged(**inputs).logits, atol=1e-5, rtol=0)
    main(["predict", "--config", str(path), "--ckpt_path", "best", "--predictions_path", str(tmp_path / "ref.jsonl")])
    main(["predict", "--config", str(path), "--model.init_args.backbone.pretrained_model_name_or_path",
          str(tmp_path / "export" / ONNX_DIR), "--model.init_args.backbone.onnx_file", ONNX_FILE,
          "--model.init_args.peft", "null", "--predictions_path", str(tmp_path / "onnx.jsonl")])
    assert records(tmp_path / "onnx.jsonl") == records(tmp_path / "ref.jsonl")


def test_what_cannot_be_compressed_is_one_error(fitted, compressed, tmp_path, capsys):
    config = str(fitted["config"])
    export = ["export", "--config", config, "--ckpt_path", "best"]
    assert_one_error(run_main(capsys, *export, "--export_dir", str(tmp_path / "a"), "--quantize", "int4"),
                     "--quantize", "int4")
    onnx_backbone = ["--model.init_args.backbone.pretrained_model_name_or_path", str(compressed / ONNX_DIR),
                     "--model.init_args.backbone.onnx_file", ONNX_FILE]
    assert_one_error(run_main(capsys, "predict", "--config", config, *onnx_backbone),
                     "backbone.onnx_file", "peft null")
    for lr in ("null", "auto"):  # auto: refused before the range test would train it
        fit = ["fit", "--config", config, *onnx_backbone, "--model.init_args.peft", "null",
               "--model.init_args.training", f"{{lr: {lr}}}", "--checkpoint.dirpath", str(tmp_path / "c")]
        assert_one_error(run_main(capsys, *fit), "backbone.onnx_file", "inference only")
    missing = ["--model.init_args.backbone.onnx_file", "model_int4.onnx", "--model.init_args.peft", "null",
               "--model.init_args.backbone.pretrained_model_name_or_path", str(compressed / ONNX_DIR)]
    assert_one_error(run_main(capsys, "predict", "--config", config, *missing), "backbone.onnx_file",
                     "does not exist")
    assert not (tmp_path / "a").exists()


def test_generators_and_virtual_tokens_are_not_compressed(tiny_bert_dir, tiny_t5_dir, tmp_path):
    prompt = SequenceClassifier(BackboneConfig(str(tiny_bert_dir)), PromptTuningConfig(num_virtual_tokens=4),
                                labels=["neg", "pos"])
    with pytest.raises(LightningPeftError, match="--onnx: PROMPT_TUNING adds virtual tokens"):
        prompt.export(tmp_path / "prompt", onnx=True)
    generator = Seq2SeqGenerator(BackboneConfig(str(tiny_t5_dir)), LoraConfig(r=2, target_modules=["q", "v"]))
    with pytest.raises(LightningPeftError, match="--quantize: compressed exports are made for encoder tasks"):
        generator.export(tmp_path / "generator", quantize="int8")
    assert not any(tmp_path.iterdir())
