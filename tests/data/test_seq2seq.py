from __future__ import annotations

import json

import pytest

from lightning_peft import LightningPeftError, Seq2SeqDataModule
from tests.conftest import write_jsonl


def datamodule(tokenizer_dir, **kwargs) -> Seq2SeqDataModule:
    return Seq2SeqDataModule(tokenizer=str(tokenizer_dir), batch_size=4, **kwargs)


def test_pairs_become_labels_and_evaluation_batches_carry_the_reference(tiny_t5_dir, toy_pairs):
    dm = datamodule(tiny_t5_dir, train_file=str(toy_pairs["train"]), validation_file=str(toy_pairs["validation"]))
    dm.setup("fit")
    tokenizer = dm.tokenizer
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    row = batch["labels"][0]
    assert row[row != -100][-1] == tokenizer.eos_token_id  # targets end with </s>; padding is -100
    val = next(iter(dm.val_dataloader()))
    references = [json.loads(line)["target"] for line in toy_pairs["validation"].read_text().splitlines()]
    assert set(val["reference"]) <= set(references) and len(val["reference"]) == 4
    decoded = tokenizer.batch_decode(val["labels"].clamp(min=0), skip_special_tokens=True)
    assert [d.replace(" .", ".") for d in decoded] == val["reference"]
    assert not hasattr(dm, "labels")  # targets are text: nothing for the CLI to link as labels


def test_nested_translation_rows_and_source_prefix(tmp_path, tiny_t5_dir):
    rows = [{"translation": {"en": "good food", "de": "nice food"}}, {"translation": {"en": "bad", "de": "poor"}}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    dm = datamodule(
        tiny_t5_dir, train_file=str(train), test_file=str(train), source_lang="de", target_lang="en",
        source_prefix="very: ",  # a prefix such as T5's "translate German to English: " (in toy words)
    )
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    sources = dm.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert sorted(sources) == ["very : nice food", "very : poor"]
    assert sorted(batch["reference"]) == ["bad", "good food"]


def test_predict_is_served_longest_first_and_remembers_the_input_order(tiny_t5_dir, toy_pairs):
    dm = datamodule(tiny_t5_dir, predict_file=str(toy_pairs["predict"]))
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["source"] == ["the food was really very bad", "good", "nice"]
    assert dm.predict_order == [1, 0, 2]
    assert batch.get("labels") is None


@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        ([{"source": "good", "target": " "}], {}, r"row 0: empty target text"),
        ([{"source": "", "target": "bad"}], {}, r"row 0: empty source text"),
        ([{"source": ["a", "b"], "target": "bad"}], {}, r"row 0: the source text is a list \(\['a', 'b'\]\); give one"),
        ([{"source": "good", "target": {"de": "x"}}], {}, r"row 0: the target text is a dict"),
        ([{"text": "good", "target": "bad"}], {}, r"no column 'source' \(columns: text, target\)"),
        ([{"translation": {"en": "good"}}], {"source_lang": "de", "target_lang": "en"}, r"no 'de' \(found \['en'\]\)"),
    ],
)
def test_bad_rows_are_clear_errors(tmp_path, tiny_t5_dir, rows, kwargs, message):
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    dm = datamodule(tiny_t5_dir, train_file=str(path), **kwargs)
    with pytest.raises(LightningPeftError, match=message) as err:
        dm.setup("fit")
    assert "train_file" in str(err.value) and str(path) in str(err.value)


def test_only_one_language_is_an_error(tiny_t5_dir):
    with pytest.raises(LightningPeftError, match="set both"):
        datamodule(tiny_t5_dir, source_lang="de")


def test_truncation_is_counted_and_reported_once_per_split(tmp_path, tiny_t5_dir):
    rows = [{"source": "good " * 20, "target": "bad " * 3}, {"source": "good", "target": "bad " * 20}] * 2
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    dm = datamodule(tiny_t5_dir, train_file=str(path), max_length=8, max_target_length=8)
    with pytest.warns(UserWarning) as record:
        dm.setup("fit")
    messages = [str(w.message) for w in record]
    assert any("train: 2 of 4 source texts are longer than max_length=8" in m for m in messages)
    assert any("train: 2 of 4 target texts are longer than max_target_length=8" in m for m in messages)
    assert max(len(ids) for ids in dm.datasets["train"]["input_ids"]) == 8
