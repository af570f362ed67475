from __future__ import annotations

import json

import pytest
from datasets import ClassLabel, Dataset, Features, Sequence, Value

from lightning_peft import LightningPeftError, TokenClassificationDataModule
from lightning_peft.data.token_classification import IGNORE_INDEX, read_conll
from tests.conftest import write_conll


def make_dm(tiny_bert_dir, **kwargs) -> TokenClassificationDataModule:
    return TokenClassificationDataModule(tokenizer=str(tiny_bert_dir), batch_size=4, **kwargs)


def test_conll_reader_skips_docstart_and_picks_the_tag_column(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("\n-DOCSTART- -X- -X- O\n\nJohn NNP B-NP B-PER\nlives VBZ B-VP O\n\n\nParis NNP B-NP B-LOC\n")
    data = read_conll(path)
    assert data["tokens"] == [["John", "lives"], ["Paris"]]
    assert data["ner_tags"] == [["B-PER", "O"], ["B-LOC"]]
    assert data["line"] == [4, 8]
    assert read_conll(path, tag_column=2)["ner_tags"] == [["B-NP", "B-VP"], ["B-NP"]]


def test_labels_discovered_in_conll_order(tiny_bert_dir, toy_ner):
    dm = make_dm(tiny_bert_dir, train_file=str(toy_ner["train"]))
    assert dm.labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


def test_first_sub_token_alignment(tiny_bert_dir, tmp_path):
    # "paris" is not in the tiny vocabulary: it splits into letters, so it has several sub-tokens
    train = write_conll(tmp_path / "train.txt", [(["john", "paris", "good"], ["B-PER", "B-LOC", "O"])])
    dm = make_dm(tiny_bert_dir, train_file=str(train), validation_file=str(train))
    dm.setup("fit")
    row = dm.datasets["validation"][0]
    label2id = dm.label2id
    word_ids = row["word_ids"]
    assert word_ids[0] == -1 and word_ids[-1] == -1 and word_ids.count(1) > 1
    expected = []
    for position, word in enumerate(word_ids):
        first = word >= 0 and (position == 0 or word_ids[position - 1] != word)
        expected.append(label2id[["B-PER", "B-LOC", "O"][word]] if first else IGNORE_INDEX)
    assert row["labels"] == expected
    assert row["word_tags"] == [label2id["B-PER"], label2id["B-LOC"], label2id["O"]]


def test_label_all_tokens_continues_entities_with_inside_tags(tiny_bert_dir, tmp_path):
    train = write_conll(tmp_path / "train.txt", [(["paris", "x"], ["B-LOC", "O"]), (["rome", "y"], ["I-LOC", "O"])])
    dm = make_dm(tiny_bert_dir, train_file=str(train), label_all_tokens=True)
    dm.setup("fit")
    labels = [t for t in dm.datasets["train"][0]["labels"] if t != IGNORE_INDEX]
    assert labels[0] == dm.label2id["B-LOC"] and set(labels[1:-1]) == {dm.label2id["I-LOC"]}


def test_truncated_words_are_reported_and_still_evaluated(tiny_bert_dir, tmp_path):
    words = ["john", "went", "to", "paris"] * 3
    tags = ["B-PER", "O", "O", "B-LOC"] * 3
    train = write_conll(tmp_path / "train.txt", [(words, tags)])
    dm = make_dm(tiny_bert_dir, train_file=str(train), validation_file=str(train), max_length=8)
    with pytest.warns(UserWarning, match=r"validation: \d+ words in 1 sentences lie beyond max_length=8"):
        dm.setup("fit")
    assert len(dm.datasets["validation"][0]["word_tags"]) == 12


def test_iob1_is_converted(tiny_bert_dir, tmp_path):
    train = write_conll(tmp_path / "train.txt", [(["john", "smith", "paris"], ["I-PER", "I-PER", "I-LOC"])])
    dm = make_dm(tiny_bert_dir, train_file=str(train), tag_scheme="IOB1")
    assert dm.labels == ["O", "B-LOC", "B-PER", "I-PER"]


def test_hf_dataset_with_class_label_tags(tiny_bert_dir, tmp_path):
    features = Features(
        {"tokens": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names=["O", "B-PER", "I-PER"]))}
    )
    Dataset.from_dict({"tokens": [["john", "smith", "good"]], "ner_tags": [[1, 2, 0]]}, features=features).to_parquet(
        str(tmp_path / "train.parquet")
    )
    dm = make_dm(tiny_bert_dir, dataset_name=str(tmp_path))
    assert dm.labels == ["O", "B-PER", "I-PER"]
    dm.setup("fit")
    assert [t for t in dm.datasets["train"][0]["labels"] if t != IGNORE_INDEX] == [1, 2, 0]


# -- bad input -----------------------------------------------------------------------------------------
def test_unknown_tag_in_validation_names_file_and_line(tiny_bert_dir, toy_ner, tmp_path):
    val = write_conll(tmp_path / "val.txt", [(["john"], ["B-PER"]), (["acme"], ["B-ORG"])])
    dm = make_dm(tiny_bert_dir, train_file=str(toy_ner["train"]), validation_file=str(val))
    with pytest.raises(LightningPeftError, match=r"val.txt:6: tag 'B-ORG' is not among the training tags"):
        dm.setup("fit")


def test_missing_tag_column_names_file_and_line(tiny_bert_dir, tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("john B-PER\nparis\n")
    with pytest.raises(LightningPeftError, match=r"train.txt:2: expected a word and a tag"):
        make_dm(tiny_bert_dir, train_file=str(train)).setup("fit")


def test_length_mismatch_and_empty_sentence_in_jsonl(tiny_bert_dir, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"tokens": ["a", "b"], "ner_tags": ["O"]}) + "\n")
    with pytest.raises(LightningPeftError, match=r"train.jsonl' row 0: 2 words but 1 tags"):
        make_dm(tiny_bert_dir, train_file=str(train)).setup("fit")
    train.write_text(json.dumps({"tokens": [], "ner_tags": []}) + "\n")
    with pytest.raises(LightningPeftError, match="empty sentence"):
        make_dm(tiny_bert_dir, train_file=str(train)).setup("fit")
    train.write_text(json.dumps({"tokens": "john lives", "ner_tags": ["B-PER", "O"]}) + "\n")
    with pytest.raises(LightningPeftError, match=r"row 0: column 'tokens' holds a str \('john lives'\); give a list"):
        make_dm(tiny_bert_dir, train_file=str(train)).setup("fit")
    train.write_text(json.dumps({"tokens": ["john", "lives"], "ner_tags": "B-PER O"}) + "\n")
    with pytest.raises(LightningPeftError, match=r"row 0: column 'ner_tags' holds a str .*\[.B-PER., .O.\]"):
        make_dm(tiny_bert_dir, train_file=str(train)).labels  # noqa: B018


def test_slow_tokenizer_is_refused(tiny_bert_dir, toy_ner, monkeypatch):
    from lightning_peft.data.base import TextDataModule

    class SlowTokenizer:
        is_fast = False

    monkeypatch.setattr(TextDataModule, "load_tokenizer", lambda self: SlowTokenizer())
    dm = make_dm(tiny_bert_dir, train_file=str(toy_ner["train"]))
    with pytest.raises(LightningPeftError, match="not a fast tokenizer"):
        dm.setup("fit")


def test_byte_level_bpe_words_keep_their_word_start_marker(tmp_path, toy_ner):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(["so john lives in new york and mary lives in paris"] * 20, vocab_size=300,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    model = json.loads(trainer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    RobertaTokenizer(vocab=model["vocab"], merges=merges).save_pretrained(tmp_path)  # add_prefix_space=False
    dm = TokenClassificationDataModule(tokenizer=str(tmp_path), train_file=str(toy_ner["train"]))
    tokenizer = dm.tokenizer
    encoded = tokenizer(["john", "lives", "paris"], is_split_into_words=True, add_special_tokens=False)
    # as in running text: every word starts with its space marker, "lives" stays one token (not "liv" + "es")
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"]) == ["Ġjohn", "Ġlives", "Ġparis"]
    assert tokenizer.add_prefix_space


def test_io_tags_are_converted_to_iob2_with_a_warning(tiny_bert_dir, tmp_path):
    path = write_conll(tmp_path / "train.txt", [(["anna", "smith", "in", "rome"], ["PER", "PER", "O", "LOC"])])
    dm = make_dm(tiny_bert_dir, train_file=str(path))
    with pytest.warns(UserWarning, match=r"no B-/I- prefix \(IO tagging\); converted to IOB2"):
        assert dm.labels == ["O", "B-LOC", "B-PER", "I-PER"]
    explicit = make_dm(tiny_bert_dir, train_file=str(path), tag_scheme="IO")
    assert explicit.raw_split("train")["ner_tags"] == [["B-PER", "I-PER", "O", "B-LOC"]]


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        (["B-PER", "PER", "O"], r":4: tag 'PER' is neither O nor <B\|I\|E\|S>-<TYPE>"),
        (["B-PER", "X-PER", "O"], r":4: tag 'X-PER' is neither O"),
    ],
    ids=["mixed-io", "unknown-prefix"],
)
def test_tags_the_metrics_cannot_read_are_errors(tiny_bert_dir, tmp_path, tags, message):
    path = write_conll(tmp_path / "train.txt", [(["anna", "smith", "went"], tags)])
    with pytest.raises(LightningPeftError, match=message):
        make_dm(tiny_bert_dir, train_file=str(path)).labels  # noqa: B018


def test_empty_words_and_tags_in_jsonl_are_errors(tiny_bert_dir, tmp_path):
    rows = [{"tokens": ["anna", ""], "ner_tags": ["B-PER", "O"]}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(LightningPeftError, match="row 0: an empty word"):
        make_dm(tiny_bert_dir, train_file=str(path)).labels  # noqa: B018
    path.write_text(json.dumps({"tokens": ["anna", "went"], "ner_tags": ["B-PER", None]}) + "\n")
    with pytest.raises(LightningPeftError, match="row 0: empty tag"):
        make_dm(tiny_bert_dir, train_file=str(path)).labels  # noqa: B018
