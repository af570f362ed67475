"""TextDataModule: its settings' checks, and its tokenisation cache (a cached split is reused only for the same data,
code, settings and tokenizer contents)."""

from __future__ import annotations

import importlib.util
import shutil
import sys

import pytest
from transformers import AutoTokenizer

from lightning_peft import ClassificationDataModule, LightningPeftError
from lightning_peft.data.base import preprocessing_code


def tokenised_train(tokenizer_dir, train_file) -> list[list[int]]:
    dm = ClassificationDataModule(tokenizer=str(tokenizer_dir), train_file=str(train_file), batch_size=4)
    dm.setup("fit")
    return dm.datasets["train"]["input_ids"]


def test_a_tokenizer_replaced_in_place_is_not_served_old_tokens(tmp_path, tiny_bert_dir, chat_tokenizer_dir,
                                                                toy_data):
    tokenizer_dir = tmp_path / "tokenizer"
    shutil.copytree(tiny_bert_dir, tokenizer_dir)
    before = tokenised_train(tokenizer_dir, toy_data["train"])
    shutil.rmtree(tokenizer_dir)
    shutil.copytree(chat_tokenizer_dir, tokenizer_dir)  # same path, another tokenizer (e.g. one re-trained there)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    after = tokenised_train(tokenizer_dir, toy_data["train"])
    assert after != before
    assert after == [tokenizer(text)["input_ids"] for text in ClassificationDataModule(
        tokenizer=str(tokenizer_dir), train_file=str(toy_data["train"])).raw_split("train")["text"]]


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


SUBCLASS = """
from lightning_peft import ClassificationDataModule

class ReorderedData(ClassificationDataModule):
    def preprocess(self, batch, split):
        batch = dict(batch, text=[{edit} for text in batch["text"]])
        return super().preprocess(batch, split)
"""


def test_edited_preprocessing_code_is_part_of_the_cache_key(tmp_path, tiny_bert_dir, toy_data):
    """The same class name, settings, data and tokenizer, but the subclass's code changed between two runs (an
    upgrade of lightning-peft is the same case for its own modules): the cached tokens are not reused."""
    versions = []
    for i, edit in enumerate(["text", "' '.join(reversed(text.split()))"]):
        path = tmp_path / f"v{i}" / "reordered.py"
        path.parent.mkdir()
        path.write_text(SUBCLASS.format(edit=edit))
        versions.append(load_module(path, f"reordered_v{i}").ReorderedData)
    assert versions[0].__qualname__ == versions[1].__qualname__
    assert preprocessing_code(versions[0]) != preprocessing_code(versions[1])
    assert preprocessing_code(ClassificationDataModule) == preprocessing_code(ClassificationDataModule)
    tokens = []
    for cls in versions:
        dm = cls(tokenizer=str(tiny_bert_dir), train_file=str(toy_data["train"]), batch_size=4)
        dm.setup("fit")
        tokens.append(dm.datasets["train"]["input_ids"])
    assert tokens[0] == tokenised_train(tiny_bert_dir, toy_data["train"])
    assert tokens[1] != tokens[0]


@pytest.mark.parametrize(("setting", "message"), [
    ({"batch_size": 0}, "data.batch_size: must be a positive integer, got 0"),
    ({"eval_batch_size": -2}, "data.eval_batch_size: must be a positive integer, got -2"),
    ({"limit_train_samples": 0}, "data.limit_train_samples: must be a positive integer, got 0"),
    ({"limit_eval_samples": -1}, "data.limit_eval_samples: must be a positive integer, got -1"),
    ({"num_workers": -1}, r"data.num_workers: must be 0 \(the main process\) or more, got -1"),
])
def test_sizes_that_cannot_work_are_refused_by_name(tiny_bert_dir, setting, message):
    """A limit of 0 read as 'the file has no rows', and num_workers -1 was a DataLoader traceback."""
    with pytest.raises(LightningPeftError, match=message):
        ClassificationDataModule(tokenizer=str(tiny_bert_dir), train_file="unused.csv", **setting)
