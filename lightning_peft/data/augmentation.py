"""Text augmentation of training rows, drawn on the fly per epoch and seeded, so a resumed run replays it."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler

from lightning_peft.errors import LightningPeftError
from lightning_peft.types import CONSISTENCY

if TYPE_CHECKING:
    from datasets import Dataset

    from lightning_peft.data.base import TextDataModule
    from lightning_peft.data.sampling import EpochSeededSampler

#: the kinds of noise, each a probability per word
KINDS = ("char_swap", "char_drop", "word_dropout", "word_swap")
#: letters a word needs before its inner letters are edited (first and last stay, as in the robustness benchmark)
MIN_EDITED_LETTERS = 4


@dataclass
class TextAugmentation:
    """Noise added to training text, each kind with its own probability per word (0: off).

    Args:
        char_swap: swap two adjacent inner letters of a word (of 4+ letters; first and last letters kept).
        char_drop: drop one inner letter of such a word.
        word_dropout: drop the word (a text keeps at least its first word). A tagger drops the word's tag with it.
        word_swap: swap the word with the next one (a tagger's tags move with their words).
        row_probability: the share of training rows augmented at all, drawn per row and epoch (1: every row); the
            others train as they are, which keeps clean text in every epoch when the per-word rates are high.
        consistency: 0 (the default): an augmented row replaces its clean self. Above 0: every training batch holds
            each row twice, as it is and augmented; the task loss is the clean rows' and adds ``consistency`` × the
            KL from each clean row's prediction, held fixed, to its augmented view's (UDA's consistency term, Xie et
            al. 2020): the noisy view learns to predict what the clean text does and its label is not trained on,
            so the clean signal is kept, at twice the compute per batch. Sequence classification only (one
            prediction per text); ``row_probability`` then does not apply.

    Applied by the datamodule to training rows only, anew each epoch: the draws of row ``i`` in epoch ``e`` come from
    a generator seeded by ``(data seed, e, i)``, so a resumed run sees exactly what an uninterrupted one would.

    Example::

        ClassificationDataModule(train_file="train.csv", augmentation=TextAugmentation(char_swap=0.1, word_dropout=0.1))

    or in YAML: ``data.init_args.augmentation: {char_swap: 0.1, word_dropout: 0.1}``.
    """

    char_swap: float = 0.0
    char_drop: float = 0.0
    word_dropout: float = 0.0
    word_swap: float = 0.0
    row_probability: float = 1.0
    consistency: float = 0.0

    def __post_init__(self) -> None:
        for name in KINDS:
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise LightningPeftError(
                    f"data.init_args.augmentation.{name}: a probability per word in [0, 1), got {value}"
                )
        if self.consistency < 0:
            raise LightningPeftError(f"data.init_args.augmentation.consistency: must be >= 0, got {self.consistency}")
        if not 0.0 < self.row_probability <= 1.0:
            raise LightningPeftError(
                f"data.init_args.augmentation.row_probability: a share of rows in (0, 1], got {self.row_probability}"
            )

    @property
    def kinds(self) -> list[str]:
        """The kinds switched on."""
        return [name for name in KINDS if getattr(self, name) > 0]

    def applies(self, rng: random.Random) -> bool:
        """Whether this row is augmented (``row_probability``; no draw when every row is)."""
        return self.row_probability >= 1.0 or rng.random() < self.row_probability

    def words(self, words: Sequence[str], rng: random.Random) -> tuple[list[int], list[str]]:
        """Augmented ``words``: for each output word, the index of the word it came from, and the word itself."""
        kept = [i for i in range(len(words)) if not (self.word_dropout and rng.random() < self.word_dropout)]
        if not kept and words:
            kept = [0]  # a text keeps at least its first word
        position = 0
        while self.word_swap and position < len(kept) - 1:
            if rng.random() < self.word_swap:
                kept[position], kept[position + 1] = kept[position + 1], kept[position]
                position += 2
            else:
                position += 1
        return kept, [self._letters(words[i], rng) for i in kept]

    def text(self, text: str, rng: random.Random) -> str:
        """Augmented ``text``, split into words at whitespace and joined with single spaces."""
        words = text.split()
        return " ".join(self.words(words, rng)[1]) if words else text

    def _letters(self, word: str, rng: random.Random) -> str:
        for probability, edit in ((self.char_swap, _swap_letters), (self.char_drop, _drop_letter)):
            if probability and len(word) >= MIN_EDITED_LETTERS and word.isalpha() and rng.random() < probability:
                word = edit(word, rng.randrange(1, len(word) - 2))
        return word


def _swap_letters(word: str, i: int) -> str:
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def _drop_letter(word: str, i: int) -> str:
    return word[:i] + word[i + 1:]


def as_augmentation(value: TextAugmentation | dict[str, Any] | None) -> TextAugmentation | None:
    if value is None or isinstance(value, TextAugmentation):
        return value
    return TextAugmentation(**value)


class AugmentedRows(TorchDataset):
    """The training split, each row augmented and tokenised when the loader asks for it: the datamodule's
    ``augment_example`` changes the raw row, its own ``preprocess`` tokenises it as it tokenises every row.

    It is indexed by ``(epoch, index)`` pairs (:class:`EpochTaggedSampler`, :class:`PairedBatches`): the epoch that
    seeds a row's noise comes with the index from the main process, because a loader's worker processes hold copies
    of the dataset (persistent workers, for the whole fit) and never see the sampler's later epochs.

    With ``augmentation.consistency`` the split is twice as long: index ``i`` is row ``i`` as it is, index ``n + i``
    its augmented view, each carrying the weight under :data:`~lightning_peft.types.CONSISTENCY`
    (:class:`PairedBatches` puts both in one batch).

    Example::

        AugmentedRows(raw_train, datamodule, seed=0)[(0, 0)]  # {'input_ids': […], 'attention_mask': […], 'labels': 1}
    """

    def __init__(self, raw: Dataset, datamodule: TextDataModule, seed: int) -> None:
        self.raw = raw
        self.datamodule = datamodule
        self.seed = seed
        self.paired = datamodule.augmentation.consistency > 0

    def __len__(self) -> int:
        return len(self.raw) * (2 if self.paired else 1)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        augmentation = self.datamodule.augmentation
        row, is_view = index % len(self.raw), index >= len(self.raw)
        rng = random.Random(f"{self.seed}:{epoch}:{row}")
        example = dict(self.raw[row])
        if is_view or (not self.paired and augmentation.applies(rng)):
            example = self.datamodule.augment_example(example, rng)
        encoded = self.datamodule.preprocess({key: [value] for key, value in example.items()}, "train")
        features = {key: values[0] for key, values in encoded.items() if key not in self.datamodule.count_columns}
        if self.paired:
            features[CONSISTENCY] = augmentation.consistency
        return features


class EpochTaggedSampler(Sampler[tuple[int, int]]):
    """``sampler``'s order as ``(epoch, index)`` pairs, the epoch of the pass that drew them: what
    :class:`AugmentedRows` is read with. Epochs, resuming and the order are the inner sampler's.

    Example::

        DataLoader(AugmentedRows(raw, dm, seed=0), batch_size=16, sampler=EpochTaggedSampler(sampler))
    """

    def __init__(self, sampler: EpochSeededSampler) -> None:
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)


class PairedBatches(Sampler[list[tuple[int, int]]]):
    """Batches of the sampler's rows followed by their augmented views (``offset`` further on), as ``(epoch, index)``
    pairs: what :class:`AugmentedRows` with ``consistency`` is read with. The order, epochs and resuming are the inner
    sampler's.

    Example::

        DataLoader(AugmentedRows(raw, dm, seed=0), batch_sampler=PairedBatches(sampler, 16, len(raw)))
    """

    def __init__(self, sampler: EpochSeededSampler, batch_size: int, offset: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.offset = offset

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, rows = self.sampler.epoch, list(self.sampler)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            yield [(epoch, row) for row in chunk] + [(epoch, row + self.offset) for row in chunk]
