from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from peft import LoraConfig

from lightning_peft import BackboneConfig, LightningPeftError, Seq2SeqDataModule, Seq2SeqGenerator, TrainingConfig
from lightning_peft.batching import MicroBatches

QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


@pytest.fixture
def bert2bert(tiny_bert_dir):
    return BackboneConfig(str(tiny_bert_dir), decoder_pretrained_model_name_or_path=str(tiny_bert_dir))


@pytest.fixture
def tiny_t5(tiny_t5_dir):
    return BackboneConfig(str(tiny_t5_dir))


def pairs(backbone: BackboneConfig, files, **kwargs) -> Seq2SeqDataModule:
    return Seq2SeqDataModule(
        tokenizer=backbone.tokenizer_name_or_path, train_file=str(files["train"]),
        validation_file=str(files["validation"]), test_file=str(files["test"]), predict_file=str(files["predict"]),
        batch_size=16, seed=0, **kwargs,
    )


def test_loading_info_sets_bert2bert_ids_and_labels_lose_the_leading_cls(bert2bert, lora, toy_pairs):
    model = Seq2SeqGenerator(bert2bert, lora)
    tokenizer = model.tokenizer
    assert model.generation_config.decoder_start_token_id == tokenizer.cls_token_id
    assert model.generation_config.eos_token_id == tokenizer.sep_token_id
    dm = pairs(bert2bert, toy_pairs)
    dm.setup("fit")
    raw = next(iter(dm.train_dataloader()))
    assert (raw["labels"][:, 0] == tokenizer.cls_token_id).all()  # what the BERT tokenizer makes of a target
    batch = model.prepare_batch(dict(raw))
    assert not (batch["labels"][:, 0] == tokenizer.cls_token_id).any()
    decoder_inputs = model.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    assert (decoder_inputs[:, 0] == tokenizer.cls_token_id).all()  # [CLS] w1 w2 … → predicts w1 w2 … [SEP]
    assert torch.equal(decoder_inputs[:, 1:3], batch["labels"][:, :2])


def test_t5_labels_are_kept_whole(tiny_t5, toy_pairs):
    model = Seq2SeqGenerator(tiny_t5, None)
    assert model.generation_config.decoder_start_token_id == 0  # T5 starts decoding from <pad>
    dm = pairs(tiny_t5, toy_pairs)
    dm.setup("fit")
    raw = next(iter(dm.train_dataloader()))
    assert torch.equal(model.prepare_batch(dict(raw))["labels"], raw["labels"])


@pytest.mark.parametrize(("which", "lr"), [("tiny_t5", 1e-2), ("bert2bert", 3e-3)])
def test_training_lowers_the_loss_and_test_generates_text(which, lr, request, toy_pairs):
    backbone = request.getfixturevalue(which)
    pl.seed_everything(0)
    # T5: LoRA with peft's default targets (q, v); the tiny BERT2BERT's decoder predicts through its frozen random
    # embeddings, too slow to learn through an adapter in a unit test, so it is fine-tuned in full
    peft = LoraConfig(r=4, lora_alpha=8) if which == "tiny_t5" else None
    model = Seq2SeqGenerator(
        backbone, peft, generation={"max_new_tokens": 12},
        training=TrainingConfig(lr=lr), val_generation_batches=0,
    )
    dm = pairs(backbone, toy_pairs)
    before = pl.Trainer(**QUIET).validate(model, datamodule=dm, verbose=False)[0]["val/loss"]
    pl.Trainer(max_epochs=4, enable_checkpointing=False, **QUIET).fit(model, datamodule=dm)
    metrics = pl.Trainer(**QUIET).test(model, datamodule=dm, verbose=False)[0]
    assert metrics["test/loss"] < 0.7 * before
    assert {"test/bleu", "test/chrf", "test/rouge1", "test/rouge2", "test/rougeL"} <= set(metrics)
    assert metrics["test/chrf"] > 0
    batch = next(iter(dm.test_dataloader()))
    texts = model.generate(batch)
    assert len(texts) == len(batch["reference"]) and all(isinstance(t, str) for t in texts)


def test_generation_stops_at_the_end_token(bert2bert, lora, toy_pairs):
    model = Seq2SeqGenerator(bert2bert, lora, generation={"max_new_tokens": 5})
    dm = pairs(bert2bert, toy_pairs)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    ids = model.model.generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], generation_config=model.generation_config
    )
    assert (ids[:, 0] == model.tokenizer.cls_token_id).all() and ids.shape[1] <= 6
    for row in ids.tolist():
        if model.tokenizer.sep_token_id in row:  # after the end token there is only padding
            tail = row[row.index(model.tokenizer.sep_token_id) + 1 :]
            assert set(tail) <= {model.tokenizer.pad_token_id}


def test_micro_batches_give_the_full_batch_loss(tiny_t5, toy_pairs):
    pl.seed_everything(0)
    model = Seq2SeqGenerator(tiny_t5, None, training={"micro_batch_size": 3}).eval()
    dm = pairs(tiny_t5, toy_pairs)
    dm.setup("fit")
    batch = model.prepare_batch(next(iter(dm.train_dataloader())))
    whole = model.compute_loss(model(batch), batch)
    assert torch.allclose(model.batch_loss(batch), whole, atol=1e-5)
    assert isinstance(model.batching, MicroBatches) and model.batching.size == 3  # seq2seq does not pack


def test_validation_generates_on_batches_spread_over_the_epoch(tiny_t5, toy_pairs, monkeypatch):
    model = Seq2SeqGenerator(tiny_t5, None, generation={"max_new_tokens": 2}, val_generation_batches=2)
    dm = pairs(tiny_t5, toy_pairs, eval_batch_size=4)  # 32 validation rows: 8 batches
    seen = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda batch: seen.append(len(seen)) or generate(batch))
    metrics = pl.Trainer(**QUIET).validate(model, datamodule=dm, verbose=False)[0]
    assert len(seen) == 2 and "val/bleu" in metrics
    assert [model.generates_in_validation(i) for i in range(8)] == [True, False, False, False, True] + [False] * 3


def test_adapter_only_checkpoint_restores_the_warm_started_model(tmp_path, bert2bert, lora, toy_pairs):
    pl.seed_everything(0)
    model = Seq2SeqGenerator(bert2bert, lora, training=TrainingConfig(lr=1e-2))
    dm = pairs(bert2bert, toy_pairs)
    trainer = pl.Trainer(max_steps=3, enable_checkpointing=False, limit_val_batches=0, **QUIET)
    trainer.fit(model, datamodule=dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert any("crossattention.modules_to_save" in k for k in saved)
    assert not any("word_embeddings" in k for k in saved)  # frozen, reloaded from the checkpoint directory
    pl.seed_everything(123)  # a different random cross-attention init underneath
    restored = Seq2SeqGenerator.load_from_checkpoint(path)
    dm.setup("test")
    batch = model.prepare_batch(next(iter(dm.test_dataloader())))
    model.eval(), restored.eval()
    assert torch.allclose(model(batch), restored(batch), atol=1e-5)


def test_encoder_only_backbone_without_decoder_is_refused(backbone, lora):
    with pytest.raises(LightningPeftError, match="without a generation head.*decoder_pretrained_model_name_or_path"):
        Seq2SeqGenerator(backbone, lora)


@pytest.mark.parametrize(
    ("generation", "message"),
    [
        ({"beams": 4}, "unknown option 'beams'"),
        ({"early_stopping": "x"}, "model.generation: `early_stopping` must be"),
        ({"num_beams": 2, "num_return_sequences": 2}, "num_return_sequences: one output per input"),
    ],
)
def test_bad_generation_options_are_refused(tiny_t5, generation, message):
    with pytest.raises(LightningPeftError, match=message):
        Seq2SeqGenerator(tiny_t5, None, generation=generation)


def test_generation_defaults_to_128_new_tokens_and_takes_overrides(tiny_t5):
    assert Seq2SeqGenerator(tiny_t5, None).generation_config.max_new_tokens == 128
    config = Seq2SeqGenerator(tiny_t5, None, generation={"num_beams": 3, "max_new_tokens": 7}).generation_config
    assert (config.num_beams, config.max_new_tokens) == (3, 7)


def test_export_reloads_with_plain_peft_and_generates_the_same(tmp_path, bert2bert, lora, toy_pairs, tiny_bert_dir):
    from peft import PeftModel
    from transformers import AutoTokenizer, EncoderDecoderModel, GenerationConfig

    pl.seed_everything(0)
    model = Seq2SeqGenerator(bert2bert, lora, generation={"max_new_tokens": 6})
    pl.Trainer(max_steps=3, enable_checkpointing=False, limit_val_batches=0, **QUIET).fit(
        model, datamodule=pairs(bert2bert, toy_pairs)
    )
    model.export(tmp_path / "export", tokenizer=model.tokenizer)

    base = EncoderDecoderModel.from_encoder_decoder_pretrained(str(tiny_bert_dir), str(tiny_bert_dir))
    reloaded = PeftModel.from_pretrained(base, tmp_path / "export" / "adapter").eval()
    generation = GenerationConfig.from_pretrained(tmp_path / "export" / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export" / "adapter")
    assert (generation.decoder_start_token_id, generation.max_new_tokens) == (tokenizer.cls_token_id, 6)
    inputs = tokenizer(["the food was good", "bad"], return_tensors="pt", padding=True, return_token_type_ids=False)
    model.eval()
    expected = model.model.generate(**inputs, generation_config=model.generation_config)
    assert torch.equal(reloaded.generate(**inputs, generation_config=generation), expected)
