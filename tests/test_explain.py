"""Attributions (``lightning_peft.explain``) and ``lightning-peft explain``."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig
from transformers import AutoTokenizer

from lightning_peft import LightningPeftError, SequenceClassifier, TokenClassifier
from lightning_peft.cli import main
from lightning_peft.explain import ATTENTION_ROLLOUT, INTEGRATED_GRADIENTS, explain
from tests.test_cli import write_config

LORA = {"r": 4, "target_modules": ["query", "value"], "init_lora_weights": False}


@pytest.fixture
def tokenizer(tiny_bert_dir):
    return AutoTokenizer.from_pretrained(tiny_bert_dir)


def target_logit(model, tokenizer, text: str, label: int, baseline: bool = False) -> float:
    encoding = tokenizer(text, return_tensors="pt")
    ids = encoding["input_ids"]
    if baseline:
        special = torch.tensor(tokenizer.get_special_tokens_mask(ids[0].tolist(), already_has_special_tokens=True))
        ids = torch.where(special.bool(), ids, torch.full_like(ids, tokenizer.pad_token_id))
    with torch.no_grad():
        return model({"input_ids": ids, "attention_mask": encoding["attention_mask"]})[0, label].item()


@pytest.mark.parametrize("peft", ["lora", "prompt_tuning"])
def test_integrated_gradients_are_complete_and_rollout_is_a_distribution(backbone, tokenizer, peft):
    torch.manual_seed(0)
    config = LoraConfig(**LORA) if peft == "lora" else PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS")
    model = SequenceClassifier(backbone, config, labels=["neg", "pos"])
    text = "the food was great unbelievably"
    explanation = explain(model, tokenizer, text, target="pos", n_steps=64)
    assert explanation.tokens[0] == "[CLS]" and "##believ" in explanation.tokens
    (attribution,) = explanation.attributions
    scores = attribution.scores[INTEGRATED_GRADIENTS]
    assert len(scores) == len(explanation.tokens)
    difference = target_logit(model, tokenizer, text, 1) - target_logit(model, tokenizer, text, 1, baseline=True)
    assert sum(scores) == pytest.approx(difference, abs=1e-3 + 1e-2 * abs(difference))
    assert abs(attribution.convergence_delta) < 1e-3 + 1e-2 * abs(difference)
    rollout = attribution.scores[ATTENTION_ROLLOUT]
    assert len(rollout) == len(scores) and min(rollout) >= 0
    if peft == "lora":
        assert sum(rollout) == pytest.approx(1.0, abs=1e-5)  # rows of the rolled-out map are distributions
    else:
        assert sum(rollout) < 1.0  # the virtual tokens take their share


def test_tagger_gets_one_attribution_per_predicted_entity(backbone, tokenizer):
    torch.manual_seed(0)
    model = TokenClassifier(backbone, LoraConfig(**LORA), labels=["O", "B-PER", "I-PER"])
    with torch.no_grad():  # a head that tags every word B-PER: one entity per word
        for name, param in model.named_parameters():
            if name.endswith("classifier.modules_to_save.default.bias"):
                param.copy_(torch.tensor([0.0, 50.0, 0.0]))
    explanation = explain(model, tokenizer, "john went to unbelievably paris")
    entities = explanation.prediction["entities"]
    assert [e["text"] for e in entities] == ["john", "went", "to", "unbelievably", "paris"]
    assert [a.entity for a in explanation.attributions] == entities
    unbelievably = explanation.attributions[3]
    assert unbelievably.target == "PER: unbelievably"
    assert all(len(s) == len(explanation.tokens) for s in unbelievably.scores.values())
    assert abs(unbelievably.convergence_delta) < 1e-2


def test_html_is_self_contained_and_json_round_trips(backbone, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = SequenceClassifier(backbone, LoraConfig(**LORA), labels=["neg", "<pos>"])
    explanation = explain(model, tokenizer, "good & bad", methods=[INTEGRATED_GRADIENTS], target="<pos>", n_steps=8)
    html_path, json_path = explanation.save(tmp_path)
    page = html_path.read_text()
    assert "&lt;pos&gt; (logit)" in page and "&amp;" in page and "<script" not in page and "http" not in page
    assert json.loads(json_path.read_text()) == explanation.to_dict()
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_requests_are_refused(backbone, tokenizer, monkeypatch):
    model = SequenceClassifier(backbone, LoraConfig(**LORA), labels=["neg", "pos"])
    with pytest.raises(LightningPeftError, match=r"--methods: choose from"):
        explain(model, tokenizer, "good", methods=["saliency"])
    with pytest.raises(LightningPeftError, match=r"--target: 'neutral' is not one of the model's labels"):
        explain(model, tokenizer, "good", target="neutral")
    with pytest.raises(LightningPeftError, match="--input: the text is empty"):
        explain(model, tokenizer, "  ")
    monkeypatch.setitem(sys.modules, "captum.attr", None)  # as if captum were not installed
    with pytest.raises(LightningPeftError, match="integrated gradients need captum"):
        explain(model, tokenizer, "good")
    assert explain(model, tokenizer, "good", methods=[ATTENTION_ROLLOUT]).attributions
    model.model.get_input_embeddings = lambda: None
    with pytest.raises(LightningPeftError, match="explain: .* gives no access to its input embeddings"):
        explain(model, tokenizer, "good")


def test_explain_command(tmp_path, tiny_bert_dir, toy_data, capsys):
    config = str(write_config(tmp_path, tiny_bert_dir, toy_data))
    main(["fit", "--config", config, "--trainer.max_epochs", "1"])
    best = str(tmp_path / "ckpt" / "best.ckpt")
    main(["explain", "--config", config, "--ckpt_path", best, "--input", "the food was great",
          "--output_dir", str(tmp_path / "why")])
    out = capsys.readouterr().out
    assert "integrated_gradients:" in out and "attention_rollout:" in out
    assert f"explanation written to {tmp_path / 'why' / 'explanation.html'}" in out
    record = json.loads((tmp_path / "why" / "explanation.json").read_text())
    assert record["tokens"][:2] == ["[CLS]", "the"] and record["prediction"]["label"] in ("neg", "pos")

    for bad, message in ((["--target", "meh"], "--target: 'meh'"), (["--methods", "[lime]"], "--methods: choose")):
        with pytest.raises(SystemExit) as exit_info:
            main(["explain", "--config", config, "--ckpt_path", best, "--input", "good", *bad])
        assert exit_info.value.code == 2
        assert f"error: explain {message}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "--config", config, "--ckpt_path", str(tmp_path / "nope.ckpt"), "--input", "good"])
    assert "error: --ckpt_path:" in capsys.readouterr().err


def test_generators_are_refused(tiny_t5_dir, tokenizer):
    from lightning_peft import BackboneConfig, Seq2SeqGenerator

    model = Seq2SeqGenerator(BackboneConfig(str(tiny_t5_dir)))
    with pytest.raises(LightningPeftError, match="explain: Seq2SeqGenerator does not name the decisions to attribute"):
        explain(model, tokenizer, "translate this")
