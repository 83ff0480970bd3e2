"""Deterministic, resumable batches split across processes.

The ``m``-th global batch is a pure function of (seed, m): an epoch-wise permutation fixed by the
seed, cut into global batches of ``batch_size × world_size``; process ``r`` takes slice ``r``.
So a resumed run sees the same data order, and N processes with B/N samples each see exactly the
samples one process with B samples would.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, keys): resumable without RNG state."""
    h = seed
    for k in keys:
        h = (h * 6364136223846793005 + k + 1442695040888963407) % (2**63)
    g = torch.Generator("cpu")
    g.manual_seed(h)
    return g


def global_batch(n: int, size: int, seed: int, m: int, stream: int = 17) -> list[int]:
    """Positions (into a pool of ``n``) of the ``m``-th global batch of ``size``."""
    if n >= size:
        per_epoch = n // size
        epoch, pos = divmod(m, per_epoch)
        order = torch.randperm(n, generator=generator(seed, stream, epoch))
        return order[pos * size : (pos + 1) * size].tolist()
    # a pool smaller than one batch: consecutive permutations, wrapped
    reps = math.ceil(size / n)
    order = torch.cat([torch.randperm(n, generator=generator(seed, stream, m * reps + r)) for r in range(reps)])
    return order[:size].tolist()


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this process's slice of global batches ``start, start+1, ..., stop-1``.

    Args:
        pool: dataset indices to draw from (all of them, or the samples routed to an expert).
        batch_size: samples per process.
        world_size, rank: the process layout.
        seed, stream: fix the order.
        start, stop: micro-batch numbers to produce (resume = start at the next one).
    """

    def __init__(self, pool: Sequence[int], batch_size: int, world_size: int, rank: int, seed: int,
                 start: int, stop: int, stream: int = 17):
        self.pool = list(pool)
        self.b, self.w, self.r = batch_size, world_size, rank
        self.seed, self.stream, self.start, self.stop = seed, stream, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        size = self.b * self.w
        for m in range(self.start, self.stop):
            pos = global_batch(len(self.pool), size, self.seed, m, self.stream)
            yield [self.pool[p] for p in pos[self.r * self.b : (self.r + 1) * self.b]]


def batch_loader(dataset: Dataset, sampler: GlobalBatchSampler, num_workers: int = 0) -> DataLoader:
    """A DataLoader over ``sampler``'s batches (images decoded in ``num_workers`` workers)."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())
