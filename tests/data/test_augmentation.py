"""Text augmentation: what each kind does, that it is seeded per epoch and row, applied to training rows only, and
that taggers keep each word's tag and seq2seq keeps its targets."""

from __future__ import annotations

import random

import pytest
import torch

from lightning_peft import (
    ChatDataModule,
    ClassificationDataModule,
    LightningPeftError,
    Seq2SeqDataModule,
    TextAugmentation,
    TokenClassificationDataModule,
)
from tests.conftest import write_conll

HEAVY = TextAugmentation(char_swap=0.5, char_drop=0.3, word_dropout=0.3, word_swap=0.3)


def test_each_kind_changes_what_it_names():
    words = ["the", "quick", "brown", "foxes", "jumped", "over", "lazy", "dogs"]
    rng = random.Random(0)
    kept, out = TextAugmentation(word_dropout=0.5).words(words, rng)
    assert out == [words[i] for i in kept] and len(out) < len(words) and kept == sorted(kept)
    kept, out = TextAugmentation(word_swap=0.9).words(words, rng)
    assert sorted(kept) == list(range(len(words))) and kept != sorted(kept) and out == [words[i] for i in kept]
    kept, out = TextAugmentation(char_swap=0.99).words(words, rng)
    assert kept == list(range(len(words)))
    for before, after in zip(words, out, strict=True):
        assert sorted(before) == sorted(after) and before[0] == after[0] and before[-1] == after[-1]
    _, out = TextAugmentation(char_drop=0.99).words(words, rng)
    assert [len(w) for w in out] == [len(w) - (len(w) >= 4) for w in words]
    assert TextAugmentation().text("left as it is", rng) == "left as it is"
    assert TextAugmentation(word_dropout=0.99).text("one two three", random.Random(1)) == "one"


def test_a_probability_outside_0_1_names_the_field():
    with pytest.raises(LightningPeftError, match=r"data.init_args.augmentation.word_swap: .* \[0, 1\), got 1.5"):
        TextAugmentation(word_swap=1.5)


def batches(dm, epoch: int) -> list[torch.Tensor]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [batch["input_ids"] for batch in loader]


def test_training_rows_change_per_epoch_reproducibly_and_evaluation_rows_never(tiny_bert_dir, toy_data):
    def datamodule(augmentation):
        dm = ClassificationDataModule(tokenizer=str(tiny_bert_dir), train_file=str(toy_data["train"]),
                                      validation_file=str(toy_data["validation"]), batch_size=16, seed=3,
                                      augmentation=augmentation)
        dm.setup("fit")
        return dm

    plain, augmented, again = datamodule(None), datamodule(HEAVY), datamodule({"char_swap": 0.5, "char_drop": 0.3,
                                                                                "word_dropout": 0.3, "word_swap": 0.3})
    epoch0 = batches(augmented, 0)
    assert [b.shape[0] for b in epoch0] == [b.shape[0] for b in batches(plain, 0)]  # same rows, same order
    assert any(not torch.equal(a, b) for a, b in zip(epoch0, batches(plain, 0), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(epoch0, batches(again, 0), strict=True))  # a resume replays it
    assert any(not torch.equal(a, b) for a, b in zip(epoch0, batches(augmented, 1), strict=True))  # anew per epoch
    for a, b in zip(augmented.val_dataloader(), plain.val_dataloader(), strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
    labels = [int(label) for batch in augmented.train_dataloader() for label in batch["labels"]]
    assert labels == [int(label) for batch in plain.train_dataloader() for label in batch["labels"]]


@pytest.mark.parametrize("augmentation", [HEAVY, {"word_dropout": 0.3, "consistency": 1.0}], ids=["rows", "views"])
def test_worker_processes_draw_each_epoch_s_noise(augmentation, tiny_bert_dir, toy_data):
    def epochs(workers: int) -> list[list[torch.Tensor]]:
        dm = ClassificationDataModule(tokenizer=str(tiny_bert_dir), train_file=str(toy_data["train"]), batch_size=16,
                                      seed=3, augmentation=augmentation, num_workers=workers)
        dm.setup("fit")
        loader = dm.train_dataloader()  # one loader for the fit, its workers persistent, as Lightning runs it
        drawn = []
        for epoch in (0, 1):
            dm._train_sampler.set_epoch(epoch)  # what Lightning's set_epoch on the loader's sampler reaches
            drawn.append([batch["input_ids"] for batch in loader])
        return drawn

    in_process, in_workers = epochs(0), epochs(2)
    for epoch in (0, 1):  # workers hold a copy of the dataset: the epoch must come with the indices
        assert all(torch.equal(a, b) for a, b in zip(in_workers[epoch], in_process[epoch], strict=True))


def test_a_tagger_drops_and_moves_tags_with_their_words(tiny_bert_dir, tmp_path):
    sentence = (["john", "smith", "went", "to", "new", "york", "today"],
                ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O"])
    path = write_conll(tmp_path / "train.txt", [sentence] * 40)
    dm = TokenClassificationDataModule(tokenizer=str(tiny_bert_dir), train_file=str(path), batch_size=8,
                                       augmentation=TextAugmentation(word_dropout=0.3, word_swap=0.2))
    dm.setup("fit")
    tag_of = dict(zip(*sentence, strict=True))
    changed = 0
    for seed in range(40):
        row = dm.augment_example({"tokens": list(sentence[0]), "ner_tags": list(sentence[1])}, random.Random(seed))
        words, tags = row["tokens"], row["ner_tags"]
        changed += words != sentence[0]
        assert len(words) == len(tags)
        for position, (word, tag) in enumerate(zip(words, tags, strict=True)):
            expected = tag_of[word]
            if expected.startswith("I-") and (position == 0 or tags[position - 1][2:] != expected[2:]):
                expected = "B-" + expected[2:]  # its entity's first word was dropped or moved: it opens the entity
            assert tag == expected, (words, tags)
    assert changed > 20
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"input_ids", "labels"} and batch["labels"].shape == batch["input_ids"].shape


def test_seq2seq_augments_the_source_and_keeps_the_target(tiny_t5_dir, toy_pairs):
    dm = Seq2SeqDataModule(tokenizer=str(tiny_t5_dir), train_file=str(toy_pairs["train"]), batch_size=8,
                           augmentation=TextAugmentation(word_dropout=0.5))
    plain = Seq2SeqDataModule(tokenizer=str(tiny_t5_dir), train_file=str(toy_pairs["train"]), batch_size=8)
    dm.setup("fit")
    plain.setup("fit")
    augmented, original = next(iter(dm.train_dataloader())), next(iter(plain.train_dataloader()))
    assert torch.equal(augmented["labels"], original["labels"])
    assert augmented["input_ids"].shape[1] < original["input_ids"].shape[1]


def test_a_datamodule_that_cannot_augment_says_so(tmp_path):
    with pytest.raises(LightningPeftError, match="data.init_args.augmentation: ChatDataModule does not augment"):
        ChatDataModule(tokenizer="unused", train_file=str(tmp_path / "x.jsonl"), augmentation={"word_dropout": 0.1})


def test_row_probability_leaves_a_share_of_rows_as_they_are():
    augmentation = TextAugmentation(word_dropout=0.9, row_probability=0.5)
    augmented = sum(augmentation.applies(random.Random(row)) for row in range(400))
    assert 160 < augmented < 240
    assert all(TextAugmentation(word_dropout=0.9).applies(random.Random(row)) for row in range(10))
    with pytest.raises(LightningPeftError, match="augmentation.row_probability: a share of rows in \\(0, 1\\]"):
        TextAugmentation(row_probability=0.0)


def test_consistency_batches_hold_each_row_and_then_its_view(tiny_bert_dir, toy_data):
    def datamodule(augmentation):
        dm = ClassificationDataModule(tokenizer=str(tiny_bert_dir), train_file=str(toy_data["train"]), batch_size=8,
                                      seed=3, augmentation=augmentation)
        dm.setup("fit")
        return dm

    plain = next(iter(datamodule(None).train_dataloader()))
    loader = datamodule({"word_dropout": 0.3, "consistency": 1.0}).train_dataloader()
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 16 and len(loader) == 40  # 320 rows in batches of 8 rows + 8 views
    clean, views = batch["input_ids"].chunk(2)
    assert torch.equal(clean[:, : plain["input_ids"].shape[1]], plain["input_ids"])  # the rows as they are, in order
    assert torch.equal(batch["labels"][:8], batch["labels"][8:]) and batch["consistency"].tolist() == [1.0] * 16
    assert not torch.equal(views[:, : clean.shape[1]], clean)
    with pytest.raises(LightningPeftError, match="augmentation.consistency: TokenClassificationDataModule"):
        TokenClassificationDataModule(tokenizer="unused", augmentation={"word_dropout": 0.1, "consistency": 1.0})
