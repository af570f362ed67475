"""MC dropout, adapter ensembles and abstention in ``SequenceClassifier.predict`` (``lightning_peft.uncertainty``)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from peft import LoraConfig

from lightning_peft import LightningPeftError, PredictionOptions, SequenceClassifier
from lightning_peft.uncertainty import CALIBRATION_FILE, dropout_on, summarise_samples
from tests.test_batching import padded_batch

LABELS = ["a", "b", "c"]


def classifier(backbone, dropout: float = 0.0, seed: int = 0, **prediction) -> SequenceClassifier:
    backbone = dataclasses.replace(backbone, model_config={"hidden_dropout_prob": dropout})
    lora = LoraConfig(r=4, target_modules=["query", "value"], lora_dropout=dropout, init_lora_weights=False)
    torch.manual_seed(seed)
    model = SequenceClassifier(backbone, lora, labels=LABELS, prediction=prediction)
    return model.eval()  # as Lightning's predict loop leaves it


def test_mc_dropout_spreads_samples_only_when_there_is_dropout(backbone):
    batch = padded_batch([5, 8, 3])
    noisy = classifier(backbone, dropout=0.3, mc_samples=6).class_distribution(batch)
    assert noisy["std"].max() > 1e-4
    assert torch.allclose(noisy["mean"].sum(-1), torch.ones(3))
    plain = classifier(backbone, dropout=0.0, mc_samples=6)
    still = plain.class_distribution(batch)
    assert still["std"].abs().max() == 0.0
    assert not any(m.training for m in plain.modules()), "dropout switched back off after sampling"


def test_dropout_on_restores_each_module_mode():
    model = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    model.eval()
    model[2].train()
    with dropout_on(model):
        assert model[0].training and model[2].training and not model[1].training
    assert [m.training for m in model] == [False, False, True]


def test_summarise_samples():
    samples = torch.tensor([[[0.9, 0.1]], [[0.5, 0.5]]])
    summary = summarise_samples(samples)
    assert summary["mean"][0].tolist() == pytest.approx([0.7, 0.3])
    assert summary["std"][0].tolist() == pytest.approx([0.2, 0.2])
    entropy = -(0.7 * torch.tensor(0.7).log() + 0.3 * torch.tensor(0.3).log())
    assert summary["entropy"].item() == pytest.approx(entropy.item())


def test_records_carry_confidence_entropy_std_and_abstention(backbone):
    batch = padded_batch([5, 8])
    batch["text"] = ["x", "y"]
    model = classifier(backbone, dropout=0.3, mc_samples=4, abstain_below=0.999)
    records = model.predict_step(batch, 0)
    for record in records:
        assert record["abstained"] is True and record["label"] is None and record["predicted"] in LABELS
        assert set(record["std"]) == set(LABELS) and record["entropy"] > 0
        assert record["confidence"] == pytest.approx(max(record["probabilities"].values()))
    plain = classifier(backbone).predict_step(batch, 0)
    assert "std" not in plain[0] and "abstained" not in plain[0] and plain[0]["label"] in LABELS


def test_ensemble_averages_exported_adapters_with_their_temperatures(backbone, tmp_path):
    batch = padded_batch([5, 8, 3])
    expected = []
    members = []
    for seed, temperature in ((1, 2.0), (2, 1.0)):
        member = classifier(backbone, seed=seed)
        member.temperature.fill_(temperature)
        export = member.export(tmp_path / f"member{seed}")
        members.append(str(export / "adapter") if seed == 1 else str(export))  # adapter/ or the export it is in
        expected.append((member(batch) / temperature).softmax(-1))
    assert json.loads((tmp_path / "member1" / "adapter" / CALIBRATION_FILE).read_text())["temperature"] == 2.0
    assert not (tmp_path / "member2" / "adapter" / CALIBRATION_FILE).exists()
    ensemble = classifier(backbone, seed=3, ensemble=members)
    own = ensemble(batch)
    ensemble.on_predict_start()
    distribution = ensemble.class_distribution(batch)
    torch.testing.assert_close(distribution["mean"], torch.stack(expected).mean(0))
    assert distribution["std"].max() > 0
    torch.testing.assert_close(ensemble(batch), own, msg="the model's own adapter is active again")


def test_ensemble_with_other_labels_is_refused(backbone, tmp_path):
    torch.manual_seed(0)
    other = SequenceClassifier(backbone, LoraConfig(r=4, target_modules=["query"]), labels=["x", "y", "z"])
    adapter = other.export(tmp_path / "other") / "adapter"
    model = classifier(backbone, ensemble=[str(adapter)])
    with pytest.raises(LightningPeftError, match=r"trained on labels \['x', 'y', 'z'\]"):
        model.on_predict_start()


@pytest.mark.parametrize(
    ("options", "message"),
    [({"mc_samples": 0}, "model.prediction.mc_samples: must be a positive"),
     ({"abstain_below": 1.5}, r"model.prediction.abstain_below: must be in \(0, 1\]"),
     ({"ensemble": ["nowhere"]}, "model.prediction.ensemble: nowhere is not an export")],
)
def test_bad_prediction_options_name_the_field(options, message):
    with pytest.raises(LightningPeftError, match=message):
        PredictionOptions(**options)


def test_prediction_options_need_a_single_label_classifier(backbone):
    with pytest.raises(LightningPeftError, match="model.prediction: .* not regression"):
        SequenceClassifier(backbone, problem_type="regression", prediction={"mc_samples": 4})
