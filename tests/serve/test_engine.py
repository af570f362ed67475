"""AdapterEngine in process: one pass for a batch mixing LoRA adapters, one base in memory, all-or-nothing loads."""

from __future__ import annotations

import pytest

from lightning_peft.serve import AdapterEngine, AdapterRefused, read_adapter
from tests.serve.test_server import assert_same_records, inputs_of


@pytest.fixture(scope="module")
def engine(served):
    engine = AdapterEngine()
    for name, run in served.items():
        engine.load(read_adapter(name, run["export"]))
    return engine


def test_a_batch_mixing_lora_adapters_is_one_forward_pass(engine, served):
    classifier = engine.models[engine.adapters["sentiment"].head]
    calls = []
    hook = classifier.base_model.model.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        answers = engine.predict([(name, inputs_of(name, served[name]), {}) for name in ("sentiment", "sentiment_b")])
    finally:
        hook.remove()
    assert len(calls) == 1
    for name, records in zip(("sentiment", "sentiment_b"), answers, strict=True):
        assert_same_records(records, served[name]["predictions"])


def test_heads_of_other_shapes_share_the_base_weights(engine):
    classifier = engine.models[engine.adapters["sentiment"].head].get_base_model()
    tagger = engine.models[engine.adapters["ner"].head].get_base_model()
    assert classifier is not tagger
    assert classifier.bert.embeddings.word_embeddings.weight is tagger.bert.embeddings.word_embeddings.weight
    query = "encoder.layer.0.attention.self.query.base_layer.weight"
    assert classifier.bert.get_parameter(query) is tagger.bert.get_parameter(query)


def test_a_refused_load_leaves_the_serving_set_unchanged(engine, served, tmp_path):
    from tests.serve.test_server import corrupt_copies

    before = {name: adapter.head for name, adapter in engine.adapters.items()}
    adapters_in_model = set(engine.models[engine.adapters["sentiment"].head].peft_config)
    with pytest.raises(AdapterRefused, match="already served"):
        engine.load(read_adapter("sentiment", served["sentiment_b"]["export"]))
    for name, path in corrupt_copies(served["sentiment"]["export"], tmp_path).items():
        with pytest.raises(AdapterRefused, match="^path: "):
            engine.load(read_adapter(name, path))
    assert {name: adapter.head for name, adapter in engine.adapters.items()} == before
    assert set(engine.models[engine.adapters["sentiment"].head].peft_config) == adapters_in_model
    assert engine.predict([("sentiment", ["good"], {})])[0][0]["label"] in ("neg", "pos")


def test_unknown_adapters_and_bad_inputs_fail_only_their_request(engine):
    answers = engine.predict([("nope", ["good"], {}), ("sentiment", ["good"], {}), ("sentiment", [7], {})])
    assert answers[0].status == 404 and answers[0].field == "adapter"
    assert answers[1][0]["text"] == "good"
    assert answers[2].field == "inputs[0]"


def test_a_calibrated_adapter_divides_its_logits_by_its_temperature(engine, served, tmp_path):
    import json
    import math
    import shutil

    calibrated = tmp_path / "calibrated"
    shutil.copytree(served["sentiment"]["export"], calibrated)
    (calibrated / "adapter" / "calibration.json").write_text(json.dumps({"temperature": 2.0}))
    engine.load(read_adapter("calibrated", calibrated))
    try:
        plain, scaled = engine.predict([("sentiment", ["good"], {}), ("calibrated", ["good"], {})])
    finally:
        engine.unload("calibrated")
    logits = {label: math.log(p) for label, p in plain[0]["probabilities"].items()}
    norm = sum(math.exp(v / 2.0) for v in logits.values())
    assert scaled[0]["probabilities"] == pytest.approx({k: math.exp(v / 2.0) / norm for k, v in logits.items()})
