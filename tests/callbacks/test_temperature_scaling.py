"""``TemperatureScaling`` through the CLI: fitted after fit, in the best checkpoint and the export, used at test
and predict; calibration report at test."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from lightning_peft.cli import main
from lightning_peft.uncertainty import CALIBRATION_FILE
from tests.test_cli import write_config


def calibrated_config(tmp_path, tiny_bert_dir, toy_data, **data_overrides):
    path = write_config(tmp_path, tiny_bert_dir, toy_data, **data_overrides)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"] = [  # the export listed first: the temperature is fitted before it anyway
        {"class_path": "lightning_peft.callbacks.AdapterExport", "init_args": {"dirpath": str(tmp_path / "export")}},
        {"class_path": "lightning_peft.callbacks.TemperatureScaling"},
    ]
    config["model"]["init_args"]["peft"]["init_args"]["lora_dropout"] = 0.2
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_fit_calibrates_exports_tests_and_predicts(tmp_path, tiny_bert_dir, toy_data, capsys):
    config = calibrated_config(tmp_path, tiny_bert_dir, toy_data)
    main(["fit", "--config", config])
    best = tmp_path / "ckpt" / "best.ckpt"
    temperature = torch.load(best, weights_only=True)["state_dict"]["temperature"].item()
    assert temperature != 1.0 and temperature > 0
    calibration = json.loads((tmp_path / "export" / "adapter" / CALIBRATION_FILE).read_text())
    assert calibration["temperature"] == pytest.approx(temperature)
    assert "temperature" in (tmp_path / "export" / "README.md").read_text()
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row.get("calibration/temperature")]
    assert float(logged[0]["calibration/temperature"]) == pytest.approx(temperature, rel=1e-5)
    assert float(logged[0]["calibration/val_nll_after"]) <= float(logged[0]["calibration/val_nll_before"]) + 1e-6
    assert "prediction" not in torch.load(best, weights_only=True)["hyper_parameters"], "steers inference only"

    main(["test", "--config", config, "--ckpt_path", str(best)])
    out = capsys.readouterr().out
    for metric in ("test/ece", "test/mce", "test/nll", "test/brier", "test/ece_scaled", "test/nll_scaled", "test/aurc"):
        assert metric in out
    log_dir = tmp_path / "lightning_logs" / "version_1"
    assert (log_dir / "reliability_diagram.png").stat().st_size > 1000
    assert (log_dir / "accuracy_coverage.png").stat().st_size > 1000

    predictions = tmp_path / "preds.jsonl"
    main([
        "predict", "--config", config, "--ckpt_path", str(best), "--predictions_path", str(predictions),
        "--model.init_args.prediction.mc_samples", "5", "--model.init_args.prediction.abstain_below", "0.6",
    ])
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(records) == 3
    for record in records:
        assert {"probabilities", "confidence", "entropy", "std", "abstained", "predicted"} <= set(record)
        assert (record["label"] is None) == (record["confidence"] < 0.6)

    main(["predict", "--config", config, "--ckpt_path", str(best), "--predictions_path", str(predictions)])
    calibrated = [json.loads(line) for line in predictions.read_text().splitlines()]
    adapter = tmp_path / "export" / "adapter"
    main([  # an ensemble from the command line, without a checkpoint: only the exported adapters are used
        "predict", "--config", config, "--predictions_path", str(predictions),
        "--model.init_args.prediction.ensemble", f"[{adapter}, {adapter}]",
    ])
    ensembled = [json.loads(line) for line in predictions.read_text().splitlines()]
    for plain, member in zip(calibrated, ensembled, strict=True):  # the export carries weights and temperature
        assert member["probabilities"] == pytest.approx(plain["probabilities"], abs=1e-5)
    assert all(max(r["std"].values()) < 1e-6 for r in ensembled)  # two copies of one adapter agree


def test_calibration_without_a_validation_split_is_refused(tmp_path, tiny_bert_dir, toy_data, capsys):
    config = calibrated_config(tmp_path, tiny_bert_dir, toy_data, validation_file=None)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--checkpoint.monitor", "null"])
    assert exit_info.value.code == 2
    assert "error: TemperatureScaling: needs a validation split" in capsys.readouterr().err


def test_bad_cli_option_values_exit_with_one_line(tmp_path, tiny_bert_dir, toy_data, capsys):
    config = calibrated_config(tmp_path, tiny_bert_dir, toy_data)
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", config, "--model.init_args.prediction.mc_samples", "0"])
    assert exit_info.value.code == 2
    assert "error: model.prediction.mc_samples: must be a positive" in capsys.readouterr().err
