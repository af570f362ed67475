"""GatheredLora gives peft's mixed-adapter forward, for adapters of other ranks and target modules."""

from __future__ import annotations

import torch
from peft import LoraConfig, LoraRuntimeConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

from lightning_peft.serve.gathered_lora import GatheredLora


def three_adapters(tiny_bert_dir):
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]), "a")
    model.add_adapter("b", LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=4, target_modules=["query"]))
    model.add_adapter("c", LoraConfig(task_type="SEQ_CLS", r=4, use_rslora=True,
                                      target_modules=["query", "value", "dense"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.normal_(0, 0.5)
    return model.eval()


def test_rows_get_their_own_adapter_as_in_peft(tiny_bert_dir):
    model = three_adapters(tiny_bert_dir)
    names = ["a", "c", "b", "a", "c"]
    inputs = {"input_ids": torch.randint(5, 60, (5, 7)), "attention_mask": torch.ones(5, 7, dtype=torch.long)}
    inputs["attention_mask"][1, 4:] = 0
    with torch.no_grad():
        expected = model(**inputs, adapter_names=names).logits
        gathered = GatheredLora.of(model)
        with gathered.routing(names):
            logits = model(**inputs, adapter_names=names).logits
        after = model(**inputs, adapter_names=names).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, expected)  # the layers are restored
    for i, name in enumerate(names):  # each row is its adapter's, alone
        model.set_adapter(name)
        with torch.no_grad():
            alone = model(**{key: value[i:i + 1] for key, value in inputs.items()}).logits
        torch.testing.assert_close(logits[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_lora_variants_are_left_to_peft(tiny_bert_dir):
    model = three_adapters(tiny_bert_dir)
    model.add_adapter("d", LoraConfig(task_type="SEQ_CLS", r=2, use_dora=True, target_modules=["query"],
                                      runtime_config=LoraRuntimeConfig()))
    assert GatheredLora.of(model) is None
