from __future__ import annotations

import json
import re

import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Sequence, Value

from lightning_peft import ClassificationDataModule, LightningPeftError
from tests.conftest import write_csv


def make_dm(tiny_bert_dir, **kwargs) -> ClassificationDataModule:
    return ClassificationDataModule(tokenizer=str(tiny_bert_dir), batch_size=8, **kwargs)


def test_label_discovery_and_batches(tiny_bert_dir, toy_data):
    dm = make_dm(tiny_bert_dir, train_file=str(toy_data["train"]), validation_file=str(toy_data["validation"]))
    assert dm.labels == ["neg", "pos"]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "labels"}
    assert batch["labels"].dtype == torch.long and batch["input_ids"].shape[0] == 8
    # dynamic padding: padded to the longest row of the batch, not to max_length
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())
    # evaluation batches are length-sorted, longest first
    lengths = [int(b["attention_mask"].sum(1).max()) for b in dm.val_dataloader()]
    assert lengths == sorted(lengths, reverse=True)


def test_explicit_labels_override_order(tiny_bert_dir, toy_data):
    dm = make_dm(tiny_bert_dir, train_file=str(toy_data["train"]), labels=["pos", "neg"])
    assert dm.labels == ["pos", "neg"]
    dm.setup("fit")
    row = dm.datasets["train"][0]
    assert row["labels"] == 0  # the first training row is "pos"


def test_text_pair_tsv_and_jsonl(tiny_bert_dir, tmp_path):
    tsv = tmp_path / "train.tsv"
    tsv.write_text('premise\thypothesis\tlabel\nthe "food" was good\tit was nice\tyes\nthe room\tawful\tno\n')
    jsonl = tmp_path / "val.jsonl"
    jsonl.write_text("\n".join(json.dumps({"premise": "good", "hypothesis": "bad", "label": "no"}) for _ in range(3)))
    dm = make_dm(
        tiny_bert_dir, train_file=str(tsv), validation_file=str(jsonl), text_column="premise",
        text_pair_column="hypothesis",
    )
    dm.setup("fit")
    row = dm.datasets["train"][0]
    assert row["token_type_ids"].count(1) > 0, "the pair must be encoded as a second segment"
    assert len(dm.datasets["validation"]) == 3


def test_limits_keep_first_rows(tiny_bert_dir, toy_data):
    dm = make_dm(
        tiny_bert_dir, train_file=str(toy_data["train"]), validation_file=str(toy_data["validation"]),
        limit_train_samples=10, limit_eval_samples=4,
    )
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 10 and len(dm.datasets["validation"]) == 4


def test_max_length_truncates(tiny_bert_dir, toy_data):
    dm = make_dm(tiny_bert_dir, train_file=str(toy_data["train"]), max_length=5)
    dm.setup("fit")
    assert max(len(ids) for ids in dm.datasets["train"]["input_ids"]) == 5


def test_multi_label_rows(tiny_bert_dir, tmp_path):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [["good food", "food,praise"], ["bad", "complaint"]])
    dm = make_dm(tiny_bert_dir, train_file=str(train), problem_type="multi_label_classification")
    assert dm.labels == ["complaint", "food", "praise"]
    dm.setup("fit")
    assert dm.datasets["train"][0]["labels"] == [0.0, 1.0, 1.0]


def test_regression_labels(tiny_bert_dir, tmp_path):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [["good", 4.5], ["bad", 0.5]])
    dm = make_dm(tiny_bert_dir, train_file=str(train), problem_type="regression")
    assert dm.labels is None
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].dtype == torch.float32


def test_hf_dataset_with_class_label_feature(tiny_bert_dir, tmp_path):
    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    for split in ("train", "validation"):
        ds = Dataset.from_dict({"sentence": ["good", "bad", "nice"], "label": [1, 0, 1]}, features=features)
        ds.to_parquet(str(tmp_path / f"{split}.parquet"))
    dm = make_dm(tiny_bert_dir, dataset_name=str(tmp_path), text_column="sentence")
    assert dm.labels == ["negative", "positive"]
    dm.setup("fit")
    assert dm.datasets["train"]["labels"][:3] == [1, 0, 1]


def test_multi_label_class_label_sequence(tiny_bert_dir, tmp_path):
    features = Features({"text": Value("string"), "label": Sequence(ClassLabel(names=["a", "b", "c"]))})
    Dataset.from_dict({"text": ["good", "bad"], "label": [[0, 2], [1]]}, features=features).to_parquet(
        str(tmp_path / "train.parquet")
    )
    dm = make_dm(tiny_bert_dir, dataset_name=str(tmp_path), problem_type="multi_label_classification")
    assert dm.labels == ["a", "b", "c"]
    dm.setup("fit")
    assert dm.datasets["train"]["labels"] == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]


# -- bad input -----------------------------------------------------------------------------------------
def test_missing_column_names_file_and_columns(tiny_bert_dir, toy_data):
    dm = make_dm(tiny_bert_dir, train_file=str(toy_data["train"]), text_column="sentence")
    with pytest.raises(LightningPeftError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert "train_file" in msg and str(toy_data["train"]) in msg and "'sentence'" in msg and "text, label" in msg


def test_unseen_validation_label(tiny_bert_dir, toy_data, tmp_path):
    val = write_csv(tmp_path / "val.csv", ["text", "label"], [["good", "pos"], ["meh", "neutral"]])
    dm = make_dm(tiny_bert_dir, train_file=str(toy_data["train"]), validation_file=str(val))
    with pytest.raises(LightningPeftError, match=r"validation_file .*val.csv' row 1: label 'neutral' is not among"):
        dm.setup("fit")


def test_empty_split(tiny_bert_dir, tmp_path):
    empty = tmp_path / "train.csv"
    empty.write_text("text,label\n")
    dm = make_dm(tiny_bert_dir, train_file=str(empty))
    with pytest.raises(LightningPeftError, match=r"train_file: .*train.csv' has no rows"):
        dm.setup("fit")


def test_unreadable_and_missing_files(tiny_bert_dir, tmp_path):
    with pytest.raises(LightningPeftError, match=r"data.train_file: .*does not exist"):
        make_dm(tiny_bert_dir, train_file=str(tmp_path / "nope.csv")).setup("fit")
    odd = tmp_path / "train.xlsx"
    odd.write_text("x")
    with pytest.raises(LightningPeftError, match="unsupported extension"):
        make_dm(tiny_bert_dir, train_file=str(odd)).setup("fit")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "good", "label": "pos"}\n{not json\n')
    with pytest.raises(LightningPeftError, match=r"train_file: cannot read .*broken.jsonl' as jsonl: JSON parse error"):
        make_dm(tiny_bert_dir, train_file=str(broken)).setup("fit")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncafé au lait,pos\n".encode("latin-1"))
    with pytest.raises(LightningPeftError, match=r"latin.csv' as csv: 'utf-8' codec can't .*as UTF-8"):
        make_dm(tiny_bert_dir, train_file=str(latin)).setup("fit")


def test_a_stage_without_its_split_names_the_option(tiny_bert_dir, toy_data):
    from lightning.pytorch.trainer.states import TrainerFn

    dm = make_dm(tiny_bert_dir, train_file=str(toy_data["train"]))
    with pytest.raises(LightningPeftError, match=r"^data.test_file: test needs a test split; set test_file"):
        dm.setup(TrainerFn.TESTING)  # what Lightning passes: an enum, named by its value
    with pytest.raises(LightningPeftError, match=r"^data.predict_file: predict needs a predict split"):
        dm.setup(TrainerFn.PREDICTING)


def test_regression_label_must_be_numeric(tiny_bert_dir, tmp_path):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [["good", "high"]])
    with pytest.raises(LightningPeftError, match="not a number"):
        make_dm(tiny_bert_dir, train_file=str(train), problem_type="regression").setup("fit")


def test_stage_without_its_split(tiny_bert_dir, toy_data):
    dm = make_dm(tiny_bert_dir, train_file=str(toy_data["train"]))
    with pytest.raises(LightningPeftError, match="test_file"):
        dm.setup("test")


def test_bad_tokenizer_path(tmp_path, toy_data):
    dm = ClassificationDataModule(tokenizer=str(tmp_path / "nope"), train_file=str(toy_data["train"]))
    with pytest.raises(LightningPeftError, match="data.tokenizer: cannot load"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("rows", "split", "message"),
    [
        ([["good", "pos"], ["bad", ""]], "train", "row 1: empty label (column 'label': None)"),
        ([["good", "pos"], ["", "neg"]], "train", "row 1: empty text (column 'text': None)"),
        ([["good", "pos"], ["   ", "neg"]], "validation", "row 1: empty text (column 'text': '   ')"),
    ],
    ids=["empty-label", "empty-text", "blank-text"],
)
def test_empty_cells_name_file_row_and_column(tiny_bert_dir, toy_data, tmp_path, rows, split, message):
    path = write_csv(tmp_path / f"{split}.csv", ["text", "label"], rows)
    files = {"train_file": str(toy_data["train"]), f"{split}_file": str(path)}
    dm = make_dm(tiny_bert_dir, **files)
    expected = re.escape(f"{split}_file '{path}' {message}; fill it in or remove the row")
    with pytest.raises(LightningPeftError, match=expected):
        dm.labels  # noqa: B018 (discovery reads train, the split checks run as each split loads)
        dm.setup("fit")


def test_nan_labels_and_empty_prediction_texts_are_refused(tiny_bert_dir, toy_data, tmp_path):
    jsonl = tmp_path / "train.jsonl"
    rows = [{"text": "good", "label": 1.0}, {"text": "bad", "label": None}]
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(LightningPeftError, match=r"row 1: empty label \(column 'label': None\)"):
        make_dm(tiny_bert_dir, train_file=str(jsonl)).labels  # noqa: B018
    regression = make_dm(tiny_bert_dir, train_file=str(jsonl), problem_type="regression")
    with pytest.raises(LightningPeftError, match="row 1: label None is not a number"):
        regression.setup("fit")
    predict = write_csv(tmp_path / "predict.csv", ["text"], [["fine"], [""]])
    dm = make_dm(tiny_bert_dir, train_file=str(toy_data["train"]), predict_file=str(predict))
    with pytest.raises(LightningPeftError, match=r"predict_file .* row 1: empty text"):
        dm.setup("predict")


@pytest.mark.parametrize(("row", "message"), [
    ({"text": ["good", "film"], "label": "pos"}, "the text (column 'text') is a list (['good', 'film']); give one text "
                                                 "per row, or put a second text in its own column"),
    ({"text": "good", "label": ["pos"]}, "the label (column 'label') is a list (['pos']); give one label per row, or "
                                         "set data.init_args.problem_type: multi_label_classification"),
    ({"text": "good", "label": {"pos": 1}}, "the label (column 'label') is a mapping ({'pos': 1})"),
], ids=["list-text", "list-label", "mapping-label"])
def test_a_cell_of_several_values_is_refused(tiny_bert_dir, tmp_path, row, message):
    """json rows can hold lists and mappings, which were trained on as their strings ("['pos']") or crashed label
    discovery."""
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text(json.dumps({"text": "fine", "label": "neg"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(LightningPeftError, match=re.escape(f"row 1: {message}")):
        dm = make_dm(tiny_bert_dir, train_file=str(jsonl))
        dm.labels  # noqa: B018
        dm.setup("fit")


def test_unlabelled_class_label_rows_are_refused(tiny_bert_dir):
    """-1 in a ClassLabel column (GLUE's test splits) is a missing label, not a traceback from int2str."""
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    data = Dataset.from_dict({"text": ["good", "bad"], "label": [1, -1]}, features=features)
    dm = make_dm(tiny_bert_dir, labels=["neg", "pos"])
    with pytest.raises(LightningPeftError, match=r"row 1: empty label \(column 'label': None\)"):
        dm.prepare_split(data, "test")


def test_the_training_order_follows_the_run_seed_unless_one_is_given(tiny_bert_dir, toy_data, monkeypatch):
    import lightning.pytorch as pl

    def first_batch(**kwargs) -> list[int]:
        dm = ClassificationDataModule(tokenizer=str(tiny_bert_dir), train_file=str(toy_data["train"]), batch_size=8,
                                      **kwargs)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))["input_ids"][:, 1].tolist()

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert first_batch() == first_batch(seed=42)  # no run seed: the old fixed order
    pl.seed_everything(7)
    assert first_batch() == first_batch(seed=7) != first_batch(seed=42)  # a new run seed draws a new order
    pl.seed_everything(8)
    assert first_batch(seed=7) != first_batch() and first_batch(seed=7) == first_batch(seed=7)
