from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, TaskType
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from lightning_peft import BackboneConfig, LightningPeftError, load_backbone
from lightning_peft.encoder_decoder import randomly_initialised_modules, train_new_modules, warm_start_encoder_decoder


@pytest.fixture
def bert2bert(tiny_bert_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    return warm_start_encoder_decoder(str(tiny_bert_dir), str(tiny_bert_dir), tokenizer), tokenizer


def test_warm_start_sets_bert_special_tokens_and_finds_the_new_modules(bert2bert):
    (model, new_modules), tokenizer = bert2bert
    for config in (model.config, model.generation_config):
        assert config.decoder_start_token_id == tokenizer.cls_token_id
        assert config.eos_token_id == tokenizer.sep_token_id
        assert config.pad_token_id == tokenizer.pad_token_id
    assert new_modules == [
        "decoder.bert.encoder.layer.0.crossattention",
        "decoder.bert.encoder.layer.1.crossattention",
        "decoder.cls.predictions.transform",
    ]
    # the decoder is causal and its self-attention/FFN weights are the encoder checkpoint's
    assert model.decoder.config.is_decoder and model.decoder.config.add_cross_attention
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(model.decoder.state_dict()[query], model.encoder.state_dict()[query.removeprefix("bert.")])


def test_randomly_initialised_modules_are_the_largest_fully_missing_ones():
    inner = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), inner)
    missing = {"1.0.weight", "1.0.bias", "1.1.weight", "1.1.bias", "0.bias"}
    assert randomly_initialised_modules(model, missing) == ["1"]  # "0" keeps its loaded weight


def test_lora_trains_the_new_modules_in_full_and_adapts_only_self_attention(tiny_bert_dir):
    spec = BackboneConfig(str(tiny_bert_dir), decoder_pretrained_model_name_or_path=str(tiny_bert_dir))
    model = load_backbone(spec, AutoModelForSeq2SeqLM, LoraConfig(r=4, target_modules=["query", "value"]))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    cross = [n for n in trainable if "crossattention" in n]
    assert cross and all(".modules_to_save.default." in n for n in cross)
    assert not any("lora_" in n for n in cross)
    assert any("transform.modules_to_save.default.dense" in n for n in trainable)
    assert any(n.endswith("decoder.bert.encoder.layer.1.attention.self.value.lora_A.default.weight") for n in trainable)
    assert any(n.endswith("encoder.encoder.layer.0.attention.self.query.lora_B.default.weight") for n in trainable)


def test_unset_target_modules_take_peft_defaults_for_the_encoder_type(bert2bert):
    (model, new_modules), _ = bert2bert
    config = train_new_modules(IA3Config(), model, new_modules)
    assert config.target_modules == {"key", "value", "output.dense"}  # peft's IA3 defaults for BERT
    assert config.feedforward_modules == {"output.dense"}
    assert set(new_modules) <= set(config.modules_to_save)


def test_methods_without_modules_to_save_are_refused(bert2bert):
    from peft import AdaptionPromptConfig

    (model, new_modules), _ = bert2bert
    with pytest.raises(LightningPeftError, match="AdaptionPromptConfig cannot train extra modules"):
        train_new_modules(AdaptionPromptConfig(adapter_len=2, adapter_layers=1), model, new_modules)


def test_prompt_learning_also_trains_the_new_modules(bert2bert):
    (model, new_modules), _ = bert2bert
    prefix = PrefixTuningConfig(num_virtual_tokens=4, task_type=TaskType.SEQ_2_SEQ_LM)
    config = train_new_modules(prefix, model, new_modules)
    assert config.modules_to_save == new_modules


def test_decoder_path_without_encoder_path_is_an_error(tiny_bert_dir):
    spec = BackboneConfig(decoder_pretrained_model_name_or_path=str(tiny_bert_dir))
    with pytest.raises(LightningPeftError, match="also set pretrained_model_name_or_path"):
        load_backbone(spec, AutoModelForSeq2SeqLM)


def test_decoder_path_outside_seq2seq_is_an_error(tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    spec = BackboneConfig(str(tiny_bert_dir), decoder_pretrained_model_name_or_path=str(tiny_bert_dir))
    with pytest.raises(LightningPeftError, match="only seq2seq tasks"):
        load_backbone(spec, AutoModelForSequenceClassification)


def test_unloadable_decoder_names_both_paths(tmp_path, tiny_bert_dir):
    spec = BackboneConfig(str(tiny_bert_dir), decoder_pretrained_model_name_or_path=str(tmp_path / "missing"))
    with pytest.raises(LightningPeftError, match=r"decoder_pretrained_model_name_or_path: cannot load .*missing"):
        load_backbone(spec, AutoModelForSeq2SeqLM)
