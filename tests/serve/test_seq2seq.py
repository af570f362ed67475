"""Seq2seq adapters served in process: a T5-style model's and a warm-started BERT2BERT's outputs equal
`lightning-peft predict`."""

from __future__ import annotations

import pytest
import yaml

from lightning_peft.serve import AdapterEngine, AdapterRefused, read_adapter
from tests.serve.conftest import fit_export_predict
from tests.test_cli import write_seq2seq_config


def seq2seq_run(tmp_path, tiny_bert_dir, toy_pairs, backbone=None):
    path = write_seq2seq_config(tmp_path, tiny_bert_dir, toy_pairs)
    config = yaml.safe_load(path.read_text())
    if backbone is not None:
        config["model"]["init_args"]["backbone"] = backbone
        config["model"]["init_args"]["peft"]["init_args"]["target_modules"] = ["q", "v"]
    config["trainer"]["max_epochs"] = 1
    path.write_text(yaml.safe_dump(config))
    return fit_export_predict(path, tmp_path)


def test_a_seq2seq_adapter_generates_what_predict_wrote(tmp_path, tiny_bert_dir, tiny_t5_dir, toy_pairs):
    run = seq2seq_run(tmp_path, tiny_bert_dir, toy_pairs, {"pretrained_model_name_or_path": str(tiny_t5_dir)})
    engine = AdapterEngine()
    engine.load(read_adapter("translate", run["export"]))
    (records,) = engine.predict([("translate", [r["source"] for r in run["predictions"]], {})])
    assert records == run["predictions"]


def test_a_warm_started_encoder_decoder_generates_what_predict_wrote(tmp_path, tiny_bert_dir, toy_pairs):
    """BERT2BERT (configs/seq2seq/multi30k_lora.yaml's shape): the base is rebuilt from the encoder and decoder
    checkpoints that the export names in encoder_decoder.json."""
    run = seq2seq_run(tmp_path, tiny_bert_dir, toy_pairs)
    adapter = read_adapter("translate", run["export"])
    assert adapter.decoder == adapter.base == str(tiny_bert_dir.resolve())
    engine = AdapterEngine()
    engine.load(adapter)
    (records,) = engine.predict([("translate", [r["source"] for r in run["predictions"]], {})])
    assert records == run["predictions"]
    plain_bert = read_adapter("plain", run["export"])
    object.__setattr__(plain_bert, "decoder", None)  # the same base without the warm start: another base
    with pytest.raises(AdapterRefused, match="adapters must share the base"):
        engine.load(plain_bert)
