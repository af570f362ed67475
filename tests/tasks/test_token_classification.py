from __future__ import annotations

import json
from pathlib import Path

import yaml

from lightning_peft.cli import main


def write_ner_config(tmp_path: Path, tiny_bert_dir: Path, toy_ner: dict[str, Path], **model_overrides) -> Path:
    config = {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu", "max_epochs": 10, "enable_progress_bar": False, "enable_model_summary": False,
            "logger": False, "default_root_dir": str(tmp_path),  # where the CLI saves config.yaml
        },
        "checkpoint": {"dirpath": str(tmp_path / "ckpt"), "monitor": "val/f1", "mode": "max"},
        "model": {
            "class_path": "lightning_peft.TokenClassifier",
            "init_args": {
                "backbone": {"pretrained_model_name_or_path": str(tiny_bert_dir)},
                "peft": {
                    "class_path": "peft.LoraConfig",
                    "init_args": {"r": 8, "target_modules": ["query", "key", "value", "dense"]},
                },
                "training": {"lr": 0.005},
                **model_overrides,
            },
        },
        "data": {
            "class_path": "lightning_peft.TokenClassificationDataModule",
            "init_args": {
                "train_file": str(toy_ner["train"]), "validation_file": str(toy_ner["validation"]),
                "test_file": str(toy_ner["test"]), "predict_file": str(toy_ner["predict"]), "batch_size": 16,
            },
        },
    }
    path = tmp_path / "ner.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_test_predict_through_the_cli(tmp_path, tiny_bert_dir, toy_ner, capsys):
    config = str(write_ner_config(tmp_path, tiny_bert_dir, toy_ner))
    main(["fit", "--config", config])
    best = tmp_path / "ckpt" / "best.ckpt"
    capsys.readouterr()
    main(["test", "--config", config, "--ckpt_path", str(best)])
    out = capsys.readouterr().out
    assert "test/f1_PER" in out and "test/f1_LOC" in out and "test/precision" in out
    f1 = float(next(line for line in out.splitlines() if "test/f1 " in line).split("│")[2])
    assert f1 > 0.8, f"the toy NER task is learnable, got entity F1 {f1}"

    predictions = tmp_path / "ner.jsonl"
    main(["predict", "--config", config, "--ckpt_path", str(best), "--predictions_path", str(predictions)])
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    expected_words = [json.loads(line)["tokens"] for line in toy_ner["predict"].read_text().splitlines()]
    assert [r["words"] for r in records] == expected_words
    for record in records:
        assert len(record["tags"]) == len(record["words"])
        for entity in record["entities"]:
            assert entity["type"] in ("PER", "LOC")
            assert entity["text"] == " ".join(record["words"][entity["start"] : entity["end"] + 1])

    main(["export", "--config", config, "--ckpt_path", str(best), "--export_dir", str(tmp_path / "export")])
    labels = json.loads((tmp_path / "export" / "adapter" / "labels.json").read_text())
    assert labels["id2label"]["0"] == "O" and "B-PER" in labels["label2id"]

    sentence = " ".join(expected_words[0])
    main(["explain", "--config", config, "--ckpt_path", str(best), "--input", sentence,
          "--output_dir", str(tmp_path / "why")])
    explanation = json.loads((tmp_path / "why" / "explanation.json").read_text())
    assert explanation["prediction"]["entities"] == records[0]["entities"]  # the same model, the same tags
    assert records[0]["entities"], "the toy sentence has entities to explain"
    assert [a["entity"] for a in explanation["attributions"]] == records[0]["entities"]
    assert all(abs(a["convergence_delta"]) < 1e-2 for a in explanation["attributions"])
