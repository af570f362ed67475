"""Training sampler: length-grouped (or plainly shuffled) order, reproducible per epoch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices


class EpochSeededSampler(Sampler[int]):
    """Shuffles with a generator seeded by ``seed + epoch``, so a run resumed at an epoch boundary sees
    exactly the order an uninterrupted run would. With ``group_by_length`` it uses transformers'
    mega-batch grouping: batches of similar lengths (less padding), in random order, longest first.

    Lightning calls :meth:`set_epoch` at each epoch start (and wraps the sampler for DDP).

    Example::

        sampler = EpochSeededSampler(lengths=[5, 9, 3, 7], batch_size=2, seed=42)
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, group_by_length: bool = True, seed: int = 0
    ) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.group_by_length = group_by_length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.group_by_length:
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))
        return iter(torch.randperm(len(self.lengths), generator=generator).tolist())
