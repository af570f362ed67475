"""``TokenClassificationDataModule``: CoNLL files or HF datasets of words + tags, aligned to sub-tokens."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset
from lightning.pytorch.utilities import rank_zero_warn
from transformers import DataCollatorForTokenClassification

from lightning_peft.data.base import is_blank
from lightning_peft.data.labelled import LabelledDataModule
from lightning_peft.errors import LightningPeftError
from lightning_peft.metrics.entities import OUTSIDE, io_to_iob2, iob1_to_iob2, is_prefixed, split_tag
from lightning_peft.types import IGNORE_INDEX

CONLL_SUFFIXES = (".txt", ".conll", ".conllu", ".iob", ".bio", ".tsv")
_PREFIX_ORDER = {"B": 0, "I": 1, "E": 2, "S": 3}


def read_conll(path: Path, tag_column: int = -1) -> Dataset:
    """Sentences of a CoNLL column file: one word per line (word first, tag in ``tag_column``), blank lines
    between sentences, ``-DOCSTART-`` lines skipped. Columns ``tokens``, ``ner_tags`` and ``line`` (the first
    line number of each sentence, for messages)."""
    tokens: list[list[str]] = []
    tags: list[list[str]] = []
    lines: list[int] = []
    words: list[str] = []
    labels: list[str] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            columns = line.split()
            if not columns or columns[0] == "-DOCSTART-":
                if words:
                    tokens.append(words), tags.append(labels)
                    words, labels = [], []
                continue
            if len(columns) < 2:
                raise LightningPeftError(
                    f"{path}:{number}: expected a word and a tag, found {len(columns)} column ({line.strip()!r}); "
                    "each line needs the word first and the tag in column data.tag_column"
                )
            if not words:
                lines.append(number)
            words.append(columns[0])
            labels.append(columns[tag_column])
    if words:
        tokens.append(words), tags.append(labels)
    return Dataset.from_dict({"tokens": tokens, "ner_tags": tags, "line": lines})


def splits_words_as_text(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` gives pre-split words (``is_split_into_words``) the sub-tokens they get in running text.

    Byte-level BPE tokenizers mark a word's start by the space before it (``Ġlives``); without
    ``add_prefix_space`` a pre-split word has no space and is cut as if it continued the word before (``liv``,
    ``es``), pieces the pretrained model rarely saw at a word's start.
    """
    words = ["the", "tagger", "reads"]
    split = tokenizer(words, is_split_into_words=True, add_special_tokens=False)["input_ids"]
    return split == tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]


def sort_tags(tags: set[str]) -> list[str]:
    """``O`` first, then by entity type and B, I, E, S."""
    def key(tag: str) -> tuple[int, str, int]:
        prefix, entity_type = split_tag(tag)
        return (0, "", 0) if tag == OUTSIDE else (1, entity_type, _PREFIX_ORDER.get(prefix, 9))

    return sorted(tags, key=key)


class TokenClassificationDataModule(LabelledDataModule):
    """Word-level tagging data (NER, POS, chunking) aligned to a fast tokenizer's sub-tokens.

    Sources: an HF dataset with ``tokens`` + ``ner_tags`` columns (``ClassLabel`` names are used), local CoNLL
    column files (``.txt``, ``.conll``, ``.iob``, ``.bio``, ``.tsv``) or json/jsonl rows with the two columns.
    Each word's first sub-token carries its tag (``label_all_tokens`` labels the others too, ``B-`` as ``I-``);
    the rest get -100. Evaluation batches carry the gold tag of *every* word, so words cut off by ``max_length``
    still count (predicted ``O``) and are reported in the log.

    Args:
        tokens_column / tags_column: word and tag columns (CoNLL files are read into these names).
        tag_column: CoNLL column index of the tag (default -1: the last).
        tag_scheme: ``IOB2`` (default), ``IOB1`` (converted to IOB2 on load), ``BIOES``, or ``IO`` (bare types such
            as ``PER``, converted to IOB2 on load: consecutive words of one type form one entity). A split whose
            tags all lack a prefix is taken as IO whatever the setting, with a warning; any other tag that is
            neither ``O`` nor ``<B|I|E|S>-<TYPE>`` is an error naming its line.
        labels: explicit tag set in id order (overrides discovery from train).
        label_all_tokens: label every sub-token, not just the first of each word.
        Other arguments: see :class:`~lightning_peft.data.base.TextDataModule`.

    Example::

        dm = TokenClassificationDataModule(
            tokenizer="bert-base-cased", train_file="conll2003/train.txt", validation_file="conll2003/valid.txt"
        )
        dm.labels  # ['O', 'B-LOC', 'I-LOC', 'B-MISC', …]
    """

    passthrough_columns = ("words", "word_ids", "word_tags")
    count_columns = ("truncated_words",)

    def __init__(
        self,
        *args: Any,
        tokens_column: str = "tokens",
        tags_column: str = "ner_tags",
        tag_column: int = -1,
        tag_scheme: Literal["IOB2", "IOB1", "BIOES", "IO"] = "IOB2",
        labels: list[str] | None = None,
        label_all_tokens: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.tokens_column = tokens_column
        self.tags_column = tags_column
        self.tag_column = tag_column
        self.tag_scheme = tag_scheme
        self.explicit_labels = list(labels) if labels else None
        self.label_all_tokens = label_all_tokens

    # -- reading ----------------------------------------------------------------------------------------
    def read_file(self, path: Path, field: str) -> Dataset:
        if path.suffix.lower() not in CONLL_SUFFIXES:
            return super().read_file(path, field)
        dataset = read_conll(path, self.tag_column)
        if len(dataset) == 0:
            raise LightningPeftError(f"{field}: {str(path)!r} has no sentences; give a non-empty split")
        return dataset.rename_columns(
            {k: v for k, v in (("tokens", self.tokens_column), ("ner_tags", self.tags_column)) if k != v}
        )

    # -- labels -----------------------------------------------------------------------------------------
    def discover_labels(self, train: Dataset) -> list[str]:
        return sort_tags({OUTSIDE} | {tag for row in train[self.tags_column] for tag in row})

    # -- TextDataModule hooks ---------------------------------------------------------------------------
    def required_columns(self, split: str) -> list[str]:
        return [self.tokens_column] + ([self.tags_column] if self.has_labels(split) else [])

    def _where(self, dataset: Dataset, split: str, row: int) -> str:
        if "line" in dataset.column_names:
            return f"{self.files[split]}:{dataset[row]['line']}"
        return f"{self.describe(split)} row {row}"

    def _normalise_tags(self, dataset: Dataset, split: str) -> Dataset:
        """ClassLabel ids → names; IOB1 and IO → IOB2; a tag the entity metrics cannot read is an error."""
        dataset = self.decode_class_labels(dataset, self.tags_column, split)
        column = self.tags_column
        for row, tags in enumerate(dataset[column]):
            for tag in tags:
                if is_blank(tag):
                    raise LightningPeftError(f"{self._where(dataset, split, row)}: empty tag ({tag!r}); every word "
                                             "needs a tag (O outside entities)")
        scheme = self.tag_scheme
        entity_tags = sorted({tag for tags in dataset[column] for tag in tags} - {OUTSIDE})
        if scheme != "IO" and entity_tags and all("-" not in tag for tag in entity_tags):
            rank_zero_warn(f"{self.describe(split)}: tags {entity_tags[:4]} have no B-/I- prefix (IO tagging); "
                           "converted to IOB2, consecutive words of one type forming one entity (set data.tag_scheme: "
                           "IO to silence this)")
            scheme = "IO"
        convert = {"IOB1": iob1_to_iob2, "IO": io_to_iob2}.get(scheme)
        if convert is not None:
            dataset = dataset.map(lambda batch: {column: [convert(row) for row in batch[column]]}, batched=True,
                                  desc=f"{scheme} → IOB2")
        for row, tags in enumerate(dataset[column]):
            for tag in tags:
                if not is_prefixed(tag):
                    raise LightningPeftError(
                        f"{self._where(dataset, split, row)}: tag {tag!r} is neither O nor <B|I|E|S>-<TYPE>, so no "
                        "entity could be scored; fix the tag, or set data.tag_scheme: IO if the file tags bare types"
                    )
        return dataset

    def prepare_split(self, dataset: Dataset, split: str) -> Dataset:
        examples = {self.tokens_column: '["John", "lives"]', self.tags_column: '["B-PER", "O"]'}
        for column in [self.tokens_column, *([self.tags_column] if self.has_labels(split) else [])]:
            for row, value in enumerate(dataset[column]):
                if not isinstance(value, list):
                    raise LightningPeftError(
                        f"{self._where(dataset, split, row)}: column {column!r} holds a {type(value).__name__} "
                        f"({value!r}); give a list, one entry per word (e.g. {examples[column]})"
                    )
        for row, words in enumerate(dataset[self.tokens_column]):
            if not words:
                raise LightningPeftError(f"{self._where(dataset, split, row)}: empty sentence (no words); remove it")
            if any(is_blank(word) for word in words):
                raise LightningPeftError(f"{self._where(dataset, split, row)}: an empty word ({words!r}); every word "
                                         "needs text")
        if not self.has_labels(split):
            return dataset
        dataset = self._normalise_tags(dataset, split)
        known = None if split == "train" and not self.explicit_labels else self.label2id
        for row, (words, tags) in enumerate(zip(dataset[self.tokens_column], dataset[self.tags_column], strict=True)):
            if len(words) != len(tags):
                raise LightningPeftError(
                    f"{self._where(dataset, split, row)}: {len(words)} words but {len(tags)} tags; "
                    "every word needs exactly one tag"
                )
            if known is not None:
                for tag in tags:
                    if tag not in known:
                        raise LightningPeftError(
                            f"{self._where(dataset, split, row)}: tag {tag!r} is not among the training tags "
                            f"{list(known)}; fix it or list every tag in data.init_args.labels"
                        )
        return dataset

    def load_tokenizer(self) -> Any:
        """The fast tokenizer, loaded with ``add_prefix_space=True`` where pre-split words would otherwise lose the
        word-start marker they carry in running text (byte-level BPE: RoBERTa, DeBERTa v1, Longformer, BART)."""
        tokenizer = super().load_tokenizer()
        if not tokenizer.is_fast:
            raise LightningPeftError(
                f"data.tokenizer: {type(tokenizer).__name__} is not a fast tokenizer; word → sub-token alignment "
                "needs one (a tokenizer.json, or a model whose tokenizer has a Rust implementation)"
            )
        if not splits_words_as_text(tokenizer):
            tokenizer = super().load_tokenizer(add_prefix_space=True)
        return tokenizer

    def _inside_id(self, label_id: int) -> int:
        prefix, entity_type = split_tag(self.labels[label_id])
        return self.label2id.get(f"I-{entity_type}", label_id) if prefix == "B" else label_id

    def augment_example(self, example: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        """Words augmented with their tags: a dropped word drops its tag, a swapped word takes its tag along; an
        ``I-`` tag left without its entity's start becomes ``B-``."""
        kept, words = self.augmentation.words(example[self.tokens_column], rng)
        tags = example[self.tags_column]
        example[self.tokens_column], example[self.tags_column] = words, iob1_to_iob2([tags[i] for i in kept])
        return example

    def preprocess(self, examples: dict[str, list[Any]], split: str) -> dict[str, list[Any]]:
        words = [[str(w) for w in row] for row in examples[self.tokens_column]]
        encoded = self.tokenizer(words, is_split_into_words=True, truncation=True, max_length=self.max_length)
        word_ids = [[-1 if w is None else w for w in encoded.word_ids(i)] for i in range(len(words))]
        encoded = dict(encoded)
        encoded["truncated_words"] = [len(row) - (max(ids) + 1) for row, ids in zip(words, word_ids, strict=True)]
        if split != "train":
            encoded["word_ids"] = word_ids
        if split == "predict":
            encoded["words"] = words
            return encoded
        label2id = self.label2id
        tag_ids = [[label2id[t] for t in row] for row in examples[self.tags_column]]
        labels = []
        for ids, tags in zip(word_ids, tag_ids, strict=True):
            row, previous = [], -1
            for word in ids:
                if word < 0:
                    row.append(IGNORE_INDEX)
                elif word != previous:
                    row.append(tags[word])
                else:
                    row.append(self._inside_id(tags[word]) if self.label_all_tokens else IGNORE_INDEX)
                previous = word
            labels.append(row)
        encoded["labels"] = labels
        if split != "train":
            encoded["word_tags"] = tag_ids
        return encoded

    def report_counts(self, split: str, counts: dict[str, list[int]]) -> None:
        cut = [n for n in counts["truncated_words"] if n > 0]
        if cut:
            rank_zero_warn(
                f"{split}: {sum(cut)} words in {len(cut)} sentences lie beyond max_length={self.max_length} "
                "sub-tokens; they are predicted as O and still count in the metrics (raise data.max_length)"
            )

    def build_collator(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        return DataCollatorForTokenClassification(self.tokenizer, label_pad_token_id=IGNORE_INDEX)
