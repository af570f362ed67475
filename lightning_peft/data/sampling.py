"""Training sampler: length-grouped (or plainly shuffled) order, reproducible per epoch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSeededSampler(Sampler[int]):
    """Training order from a generator seeded by ``seed + epoch``, so a run resumed at an epoch boundary sees
    exactly the order an uninterrupted run would. Lightning calls :meth:`set_epoch` (and wraps it for DDP).

    With ``group_by_length`` a random permutation is cut into windows of ``window`` batches; each window is
    sorted by length and cut into batches, and then the *order of the batches* is shuffled. Batches are thus
    random samples of similar length, with a short remainder batch last, so the DataLoader's batches are
    exactly these groups. ``window=None`` sorts the whole split: the least padding, but batches of one length.
    Unlike transformers' ``LengthGroupedSampler`` (windows of 50 batches, each visited long → short, the
    longest batch first) there is no length curriculum and no longest-first batch: in our SST-2 benchmark a
    longest-first batch alone cost 7-14 points of dev accuracy (Adam's second-moment estimate, which decays
    over ~1000 steps, starts from that batch's large gradients and damps the whole short run).

    Example::

        sampler = EpochSeededSampler(lengths=[5, 9, 3, 7], batch_size=2, seed=42)
        DataLoader(dataset, batch_size=2, sampler=sampler)  # same batch_size as the sampler's
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        group_by_length: bool = True,
        window: int | None = 2,
        seed: int = 0,
    ) -> None:
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size = batch_size
        self.group_by_length = group_by_length
        self.window = window
        self.seed = seed
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, samples of it already trained on)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, samples: int) -> None:
        """Make the next pass over ``epoch`` skip its first ``samples`` indices (a run resumed mid-epoch)."""
        self._resume = (epoch, samples)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        resume, self._resume = self._resume, None
        if resume is not None and resume[0] == self.epoch:
            return iter(order[resume[1]:])
        return iter(order)

    def _order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        permutation = torch.randperm(len(self.lengths), generator=generator)
        if not self.group_by_length or len(permutation) == 0:
            return permutation.tolist()
        windows = [permutation] if self.window is None else permutation.split(self.batch_size * self.window)
        by_length = torch.cat(
            [w[torch.sort(self.lengths[w], descending=True, stable=True).indices] for w in windows]
        )
        batches = list(by_length.split(self.batch_size))
        remainder = [batches.pop()] if len(batches[-1]) < self.batch_size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return torch.cat(shuffled + remainder).tolist()


class ResumableDataLoader(DataLoader):
    """A training ``DataLoader`` that Lightning treats as resumable mid-epoch (no "not resumable" warning, no epoch
    restarted from its start). Its position is not its own state: the datamodule saves the epoch and the batches
    already run and points its :class:`EpochSeededSampler` past them (``TextDataModule.state_dict``), because
    Lightning restores a loader's state only into loaders built after the restore, and ours is built before it.

    Example::

        loader = ResumableDataLoader(dataset, batch_size=32, sampler=EpochSeededSampler(lengths, 32))
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore here (see the class docstring)."""
