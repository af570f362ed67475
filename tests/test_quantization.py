"""Adapters on a quantised base (torchao int8 weight-only on CPU; bitsandbytes 4-bit on CUDA only): fit, test,
resume, export with a full-precision merge, and one clear error for combinations that cannot train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, TorchAoConfig

from lightning_peft import BackboneConfig, SequenceClassifier
from lightning_peft.checkpoints import load_checkpoint
from lightning_peft.cli import main
from lightning_peft.errors import LightningPeftError
from lightning_peft.export import merged_model
from lightning_peft.quantization import (
    as_quantization_config,
    check_quantization,
    dequantized_peft_model,
    is_quantized,
    plain_quantization,
    prepare_for_training,
)
from tests.test_cli import assert_one_error, run_main, write_config

torchao = pytest.importorskip("torchao")
from torchao.quantization import Int8WeightOnlyConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shipped_quantization(name: str) -> dict:
    """``backbone.quantization`` of the preset ``configs/quantization/<name>``."""
    return yaml.safe_load((REPO / "configs" / "quantization" / name).read_text())["model"]["init_args"]["backbone"][
        "quantization"]


INT8, NF4 = shipped_quantization("int8.yaml"), shipped_quantization("qlora_4bit.yaml")


def quantised_config(tmp_path: Path, tiny_bert_dir: Path, toy_data: dict[str, Path], quantization: dict,
                     **model_overrides) -> Path:
    path = write_config(tmp_path, tiny_bert_dir, toy_data)
    config = yaml.safe_load(path.read_text())
    config["model"]["init_args"]["backbone"]["quantization"] = quantization
    config["model"]["init_args"].update(model_overrides)
    config["trainer"]["max_epochs"] = 1
    path.write_text(yaml.safe_dump(config))
    return path


def probe_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(5, 60, (4, 12), generator=generator),
            "attention_mask": torch.ones(4, 12, dtype=torch.long)}


def test_fit_test_resume_export_on_an_int8_base(tmp_path, tiny_bert_dir, toy_data):
    config = str(quantised_config(tmp_path, tiny_bert_dir, toy_data, INT8))
    main(["fit", "--config", config])
    checkpoint = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")  # weights_only: plain data
    assert set(checkpoint["state_dict"]) == {"temperature"} | {
        name for name in checkpoint["state_dict"] if ".lora_" in name or ".modules_to_save." in name
    }
    assert checkpoint["hyper_parameters"]["backbone"]["quantization"]["class_path"] == "transformers.TorchAoConfig"

    main(["fit", "--config", config, "--trainer.max_epochs", "2", "--ckpt_path", "last"])  # resume unchanged
    assert load_checkpoint(tmp_path / "ckpt" / "last.ckpt")["epoch"] == 1
    main(["test", "--config", config, "--ckpt_path", "best"])
    main(["export", "--config", config, "--ckpt_path", "best", "--export_dir", str(tmp_path / "export"),
          "--merge", "true", "--quantize", "int8"])  # de-quantised, merged, then quantised again

    task = SequenceClassifier.load_from_checkpoint(tmp_path / "ckpt" / "best.ckpt", weights_only=True, strict=False)
    assert is_quantized(task.model)
    assert type(task.model.base_model.model.bert.encoder.layer[0].intermediate.dense.weight).__name__ == "Int8Tensor"
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export" / "merged").eval()
    assert not hasattr(merged.config, "quantization_config")
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in merged.parameters())
    inputs = probe_inputs()
    with torch.no_grad():
        merged_logits = merged(**inputs).logits
        adapter_on_dequantised = dequantized_peft_model(task.model).eval()(**inputs).logits
        quantised_logits = task.model.eval()(**inputs).logits
    # the merge itself is exact up to float rounding …
    torch.testing.assert_close(merged_logits, adapter_on_dequantised, atol=1e-5, rtol=1e-5)
    # … and the de-quantised model is what the int8 layers computed with: drift only from activation rounding
    drift = (merged_logits - quantised_logits).abs().max().item()
    print(f"max |logit| drift, merged vs int8-base model: {drift:.2e}")
    assert drift < 1e-3
    card = (tmp_path / "export" / "README.md").read_text()
    assert "torchao Int8WeightOnlyConfig (backbone.quantization)" in card
    assert "de-quantised to float32" in card
    int8 = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export" / "int8").eval()
    with torch.no_grad():
        torch.testing.assert_close(int8(**inputs).logits, merged_logits, atol=5e-2, rtol=0)


def test_minilm_on_int8_fits_tests_and_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    configs = ["--config", "configs/quickstart.yaml", "--config", "configs/quantization/int8.yaml"]
    run = ["--trainer.default_root_dir", str(tmp_path), "--checkpoint.dirpath", str(tmp_path / "ckpt"),
           "--data.init_args.limit_train_samples", "64", "--data.init_args.limit_eval_samples", "32"]
    main(["fit", *configs, *run, "--trainer.max_epochs", "1"])
    main(["test", *configs, *run, "--ckpt_path", "best"])
    main(["export", *configs, "--checkpoint.dirpath", str(tmp_path / "ckpt"), "--ckpt_path", "best",
          "--export_dir", str(tmp_path / "export"), "--merge", "true"])
    task = SequenceClassifier.load_from_checkpoint(tmp_path / "ckpt" / "best.ckpt", weights_only=True, strict=False)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export" / "merged").eval()
    inputs = probe_inputs()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, task.model.eval()(**inputs).logits, atol=1e-4, rtol=0)


def test_an_adapter_trained_on_int8_loads_on_a_plain_base_with_peft(tmp_path, tiny_bert_dir):
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert_dir, num_labels=2, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
    )
    model = get_peft_model(prepare_for_training(base), LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    torch.nn.init.normal_(model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_B["default"].weight)
    plain_merged = merged_model(model)
    assert not is_quantized(plain_merged)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2), tmp_path / "adapter"
    ).eval()
    inputs = probe_inputs()
    with torch.no_grad():
        # a full-precision base differs from the int8 one only by the weights' int8 rounding
        torch.testing.assert_close(reloaded(**inputs).logits, plain_merged.eval()(**inputs).logits, atol=2e-2, rtol=0)


def test_the_config_round_trips_through_plain_data():
    config = TorchAoConfig(Int8WeightOnlyConfig())
    plain = plain_quantization(config)
    assert isinstance(as_quantization_config(plain), TorchAoConfig)
    assert type(as_quantization_config(INT8).quant_type).__name__ == "Int8WeightOnlyConfig"
    assert BackboneConfig("x", quantization=plain).quantization.quant_type == config.quant_type
    with pytest.raises(LightningPeftError, match="backbone.quantization: expected a transformers quantisation"):
        as_quantization_config({"bits": 4})


@pytest.mark.parametrize(
    ("quantization", "overrides", "fragments"),
    [
        (NF4, {}, ["backbone.quantization", "bitsandbytes 4-bit nf4", "CUDA"]),
        (INT8, {"peft": {"class_path": "peft.IA3Config", "init_args": {"target_modules": ["query"],
                                                                         "feedforward_modules": []}}},
         ["model.init_args.peft", "IA3", "torchao Int8WeightOnlyConfig", "lora"]),
        (INT8, {"peft": None}, ["backbone.quantization", "frozen base", "peft is null"]),
    ],
    ids=["4bit-without-cuda", "method-without-int8-layers", "full-fine-tuning"],
)
def test_impossible_combinations_are_one_error_before_loading(tmp_path, tiny_bert_dir, toy_data, capsys,
                                                              quantization, overrides, fragments):
    if quantization is NF4 and torch.cuda.is_available():
        pytest.skip("CUDA is present: 4-bit loads")
    missing = tmp_path / "no-such-model"  # the check comes first: a load would fail on this path instead
    config = quantised_config(tmp_path, missing, toy_data, quantization, **overrides)
    assert_one_error(run_main(capsys, "fit", "--config", str(config)), *fragments)


def test_fsdp_on_a_quantised_base_is_refused_naming_both(tmp_path, toy_data, capsys):
    config = quantised_config(tmp_path, tmp_path / "no-such-model", toy_data, INT8)
    result = run_main(capsys, "fit", "--config", str(config), "--trainer.strategy", "fsdp")
    assert_one_error(result, "trainer.strategy", "FSDP", "backbone.quantization")


def test_a_model_built_from_a_config_is_not_quantised():
    with pytest.raises(LightningPeftError, match="save that model with save_pretrained"):
        check_quantization(TorchAoConfig(Int8WeightOnlyConfig()), LoraConfig(), is_pretrained=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes 4-bit needs CUDA")
def test_qlora_4bit_fit_and_merge_on_cuda(tmp_path, tiny_bert_dir, toy_data):
    pytest.importorskip("bitsandbytes")
    config = quantised_config(tmp_path, tiny_bert_dir, toy_data, NF4)
    main(["fit", "--config", str(config), "--trainer.accelerator", "gpu", "--trainer.devices", "1"])
    main(["export", "--config", str(config), "--ckpt_path", "best", "--export_dir", str(tmp_path / "export"),
          "--merge", "true", "--trainer.accelerator", "gpu"])
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export" / "merged")
    assert not hasattr(merged.config, "quantization_config")
