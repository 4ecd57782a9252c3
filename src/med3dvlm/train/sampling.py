"""Deterministic data order for training: what a batch holds depends only on (seed, epoch, index).

`EpochSampler` shuffles by (seed, epoch) alone, so every process of a distributed run agrees and a resumed
run rebuilds the order without saved sampler state; `EpochSeededDataset` seeds each item's randomness
(augmentation, prompt choice) by (seed, epoch, index), whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler


class EpochSampler(Sampler[int]):
    """Indices 0..n-1, shuffled with a generator seeded by (seed, epoch) only.

    Every process of a distributed run draws the same order (Accelerate then shards the batches), and
    the order of an epoch can be rebuilt after a restart without any saved sampler state.

    With `lengths` (one number per item, e.g. its text length) and `batch_size`, items are grouped by length
    as Hugging Face's `group_by_length` does: the shuffled order is cut into mega-batches of 16 batches, each
    sorted by length, and the batches of a mega-batch are shuffled. A batch then holds items of similar
    length, so little of it is padding.
    """

    MEGA = 16  # batches per mega-batch

    def __init__(self, n: int, seed: int, shuffle: bool = True, lengths: Sequence[float] | None = None, batch_size: int = 1) -> None:
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} items")
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0
        self.lengths, self.batch_size = lengths, batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if self.lengths is None:
            return iter(order)
        grouped: list[int] = []
        mega = self.MEGA * self.batch_size
        for start in range(0, self.n, mega):
            chunk = sorted(order[start:start + mega], key=lambda i: -self.lengths[i])  # type: ignore[index]
            batches = [chunk[k:k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
            for b in torch.randperm(len(batches), generator=g).tolist():
                grouped.extend(batches[b])
        return iter(grouped)

    def __len__(self) -> int:
        return self.n


class EpochSeededDataset(Dataset):
    """Wraps a dataset so each sample's randomness depends only on (seed, epoch, index).

    Around every ``__getitem__`` the torch, numpy and `random` global generators are seeded from
    (seed, epoch, index) and restored afterwards. Random augmentation drawn from the global RNGs therefore
    repeats exactly after a resume, with any number of workers, and loading data never shifts the
    training RNG stream (dropout) of the main process.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)  # type: ignore[union-attr]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        import random

        import numpy as np

        seed = int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0])
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def __getattr__(self, name: str) -> Any:
        # Reach the wrapped dataset's attributes (e.g. `skipped`), but not during unpickling in workers.
        if name in ("dataset", "seed", "epoch"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device). Stages call it first, before any model or data is built."""
    from accelerate.utils import set_seed

    set_seed(seed)


def sample_indices(n: int, limit: int, seed: int) -> list[int]:
    """`limit` of the indices 0..n-1 drawn without replacement by (seed), in ascending order (all when limit >= n)."""
    if limit >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:limit].tolist())
