from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml
from peft import LoraConfig
from transformers.models.bert.modeling_bert import BertLayer

from lightning_peft import BackboneConfig, LightningPeftError, SequenceClassifier
from lightning_peft.callbacks import AdaLoRAScheduler
from lightning_peft.callbacks.adalora import AdaLoraConfig
from lightning_peft.strategies import PeftFSDPStrategy, transformer_block_classes
from tests.test_cli import REPO


def wraps(policy, module) -> bool:
    return bool(policy(module=module, recurse=False, nonwrapped_numel=0))


def test_fsdp_wraps_blocks_and_trainable_leaves_apart_from_frozen_weights(tiny_bert_dir):
    model = SequenceClassifier(BackboneConfig(str(tiny_bert_dir)), LoraConfig(r=2, target_modules=["query"]),
                               labels=["a", "b"])
    spec = yaml.safe_load((REPO / "configs" / "trainer" / "fsdp.yaml").read_text())["trainer"]["strategy"]
    assert spec["class_path"] == "lightning_peft.strategies.PeftFSDPStrategy"
    strategy = PeftFSDPStrategy(**spec["init_args"])
    strategy.connect(model)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert BertLayer in transformer_block_classes(model.model)  # with BertEmbeddings: transformers keeps both whole
    query = model.model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert wraps(policy, model.model.base_model.model.bert.encoder.layer[0])
    assert wraps(policy, query.lora_A["default"]) and wraps(policy, query.lora_B["default"])
    assert not wraps(policy, query.base_layer)  # frozen: stays in its block's unit
    assert strategy.kwargs["use_orig_params"]


def test_activation_checkpointing_targets_the_blocks(tiny_bert_dir):
    model = SequenceClassifier(BackboneConfig(str(tiny_bert_dir)), LoraConfig(r=2, target_modules=["query"]),
                               labels=["a", "b"])
    strategy = PeftFSDPStrategy(activation_checkpointing_blocks=True)
    strategy.connect(model)
    check = strategy._activation_checkpointing_kwargs["check_fn"]
    assert check(model.model.base_model.model.bert.encoder.layer[1]) and not check(model.model.base_model.model.bert)


def test_adalora_is_refused_under_fsdp(tiny_bert_dir):
    config = AdaLoraConfig(init_r=4, target_r=2, target_modules=["query"])
    model = SequenceClassifier(BackboneConfig(str(tiny_bert_dir)), config, labels=["a", "b"])
    trainer = SimpleNamespace(strategy=PeftFSDPStrategy())
    with pytest.raises(LightningPeftError, match="AdaLoRA cannot run under FSDP"):
        AdaLoRAScheduler().setup(trainer, model, "fit")
