from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from peft import LoraConfig

from lightning_peft import ClassificationDataModule, TrainingConfig
from lightning_peft.batching import SequencePacking

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_head_subclass_trains_its_own_head(backbone, tiny_bert_dir, toy_data, tmp_path):
    example = load_example("custom_head")
    dm = ClassificationDataModule(
        tokenizer=str(tiny_bert_dir), train_file=str(toy_data["train"]), validation_file=str(toy_data["validation"]),
        batch_size=16,
    )
    model = example.MeanPoolingClassifier(
        backbone, LoraConfig(r=4, target_modules=["query", "value"]), labels=dm.labels, hidden_dim=16,
        training=TrainingConfig(lr=1e-2),
    )
    head_before = [p.detach().clone() for p in model.head.parameters()]
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="sequence_packing")
        trainer.fit(model, datamodule=dm)
    assert isinstance(model.batching, SequencePacking), "the custom head trains packed"
    assert all(not torch.equal(a, b) for a, b in zip(head_before, model.head.parameters(), strict=True))
    assert not hasattr(model.model.get_base_model(), "classifier"), "the HF head is replaced, not kept beside"
    checkpoint = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=True)
    assert any(k.startswith("head.") for k in checkpoint["state_dict"])
    assert checkpoint["hyper_parameters"]["hidden_dim"] == 16
