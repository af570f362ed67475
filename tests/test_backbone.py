from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig, TaskType
from transformers import AutoModelForSequenceClassification

from lightning_peft import BackboneConfig, LightningPeftError, load_backbone
from lightning_peft.backbone import count_parameters, linear_layer_names


def test_lora_from_local_directory_trains_adapter_and_head_only(backbone, lora):
    model = load_backbone(backbone, AutoModelForSequenceClassification, lora, TaskType.SEQ_CLS, num_labels=3)
    assert isinstance(model, PeftModel)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing is trainable"
    assert all("lora_" in n or "classifier" in n for n in trainable)
    assert any("classifier" in n for n in trainable), "the task head must be trainable (peft task type)"
    n_trainable, n_total = count_parameters(model)
    assert 0 < n_trainable < n_total / 5


def test_caller_peft_config_is_not_mutated(backbone, lora):
    load_backbone(backbone, AutoModelForSequenceClassification, lora, TaskType.SEQ_CLS, num_labels=2)
    assert lora.task_type is None


@pytest.mark.parametrize(
    "peft_config",
    [
        IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]),
        PromptTuningConfig(num_virtual_tokens=4),
        LoraConfig(r=2, target_modules=["query"], use_dora=True),
    ],
    ids=["ia3", "prompt-tuning", "dora"],
)
def test_any_peft_method_applies(backbone, peft_config):
    model = load_backbone(backbone, AutoModelForSequenceClassification, peft_config, TaskType.SEQ_CLS, num_labels=2)
    out = model(input_ids=torch.tensor([[2, 7, 9, 3]]), attention_mask=torch.ones(1, 4, dtype=torch.long))
    assert out.logits.shape == (1, 2)


def test_unmatched_target_modules_lists_linear_layers(backbone):
    config = LoraConfig(r=2, target_modules=["query", "q_proj"])
    with pytest.raises(LightningPeftError) as err:
        load_backbone(backbone, AutoModelForSequenceClassification, config, TaskType.SEQ_CLS, num_labels=2)
    message = str(err.value)
    assert "['q_proj']" in message and "peft.target_modules" in message
    assert "'query'" in message and "'value'" in message and "'dense'" in message


def test_regex_target_modules_that_match_nothing(backbone):
    config = LoraConfig(r=2, target_modules=r".*\.q_proj")
    with pytest.raises(LightningPeftError, match="match no module"):
        load_backbone(backbone, AutoModelForSequenceClassification, config, TaskType.SEQ_CLS, num_labels=2)


def test_missing_model_path_is_a_clear_error(tmp_path):
    spec = BackboneConfig(pretrained_model_name_or_path=str(tmp_path / "nope"))
    with pytest.raises(LightningPeftError, match=r"backbone.pretrained_model_name_or_path: cannot load"):
        load_backbone(spec, AutoModelForSequenceClassification)


def test_random_init_from_config_and_overrides():
    spec = BackboneConfig(
        model_config={"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "intermediate_size": 32, "vocab_size": 50}
    )
    model = load_backbone(spec, AutoModelForSequenceClassification, num_labels=4)
    assert model.config.hidden_size == 16 and model.config.num_labels == 4
    with pytest.raises(LightningPeftError, match="model_type"):
        load_backbone(BackboneConfig(), AutoModelForSequenceClassification)


def test_pretrained_config_overrides(tiny_bert_dir):
    spec = BackboneConfig(pretrained_model_name_or_path=str(tiny_bert_dir), model_config={"hidden_dropout_prob": 0.3})
    model = load_backbone(spec, AutoModelForSequenceClassification, num_labels=2)
    assert model.config.hidden_dropout_prob == 0.3


def test_gradient_checkpointing_with_lora_backpropagates(tiny_bert_dir, lora):
    spec = BackboneConfig(pretrained_model_name_or_path=str(tiny_bert_dir), gradient_checkpointing=True)
    model = load_backbone(spec, AutoModelForSequenceClassification, lora, TaskType.SEQ_CLS, num_labels=2)
    model.train()
    assert model.get_base_model().is_activation_checkpointing
    out = model(input_ids=torch.tensor([[2, 7, 9, 3]]), labels=torch.tensor([1]))
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # lora_A starts with zero grad (B = 0)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_dtype_option(tiny_bert_dir):
    spec = BackboneConfig(pretrained_model_name_or_path=str(tiny_bert_dir), dtype="bfloat16")
    model = load_backbone(spec, AutoModelForSequenceClassification, num_labels=2)
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(LightningPeftError, match="backbone.dtype"):
        load_backbone(BackboneConfig(str(tiny_bert_dir), dtype="float13"), AutoModelForSequenceClassification)


def test_linear_layer_names(backbone):
    model = load_backbone(backbone, AutoModelForSequenceClassification, num_labels=2)
    assert {"query", "key", "value", "dense", "classifier"} <= set(linear_layer_names(model))


def test_position_limit_reads_each_architecture_s_position_table():
    """BERT's table, RoBERTa's after its padding index, GPT-2's ``wpe``, BART's past its offset; none for relative
    (T5) or rotary (Llama) positions, which have no table to run past."""
    from transformers import (
        BartConfig,
        BartModel,
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2Model,
        LlamaConfig,
        LlamaModel,
        RobertaConfig,
        RobertaModel,
        T5Config,
        T5Model,
    )

    from lightning_peft.backbone import position_limit

    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    assert position_limit(BertModel(BertConfig(**small, max_position_embeddings=128))) == 128
    assert position_limit(RobertaModel(RobertaConfig(**small, max_position_embeddings=514, pad_token_id=1))) == 512
    assert position_limit(GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=256))) == 256
    bart = BartConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)
    assert position_limit(BartModel(bart)) == 64
    assert position_limit(T5Model(T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=32, d_kv=16))) is None
    assert position_limit(LlamaModel(LlamaConfig(**small))) is None
