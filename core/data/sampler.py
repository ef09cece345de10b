"""A deterministic, resumable, rank-sharded sampler.

Notation: ``n`` items, ``R`` processes (ranks), rank ``r``, epoch ``e``.

1. The epoch's order is ``perm_e = randperm(n)`` from a generator seeded with ``(seed, e)`` only
   (or ``0..n-1`` without shuffling), so it depends on nothing but the seed and the epoch.
2. The epoch is a stream of ``L = ceil(n / R) * R`` positions; position ``p`` holds
   ``perm_e[p % n]`` (the tail wraps around, as torch's ``DistributedSampler`` pads).
3. Rank ``r`` takes positions ``c + r, c + r + R, ...``, where ``c`` is the number of positions
   already consumed by all ranks together (0 at the start of an epoch).

The state is ``(epoch, c)``: a run resumed with it yields exactly the items the uninterrupted run
still had to see in that epoch.

4. With ``epoch_index``, item ``i`` of epoch ``e`` is yielded as ``e * n + i``: a data set that
   draws random augmentations seeds them with that number (and takes item ``index % n``), so its
   draws depend on the seed, the epoch and the item only, never on the global RNG, the DataLoader
   workers or how far the loader prefetched; a resumed run draws what the uninterrupted one did.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Yields rank ``rank``'s share of epoch ``epoch``'s order, from position ``consumed`` on."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0,
                 epoch_index: bool = False):
        if size < 1:
            raise ValueError(f"ResumableSampler: the data set is empty (size={size})")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"ResumableSampler: rank {rank} is not in [0, {num_replicas})")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.num_replicas, self.rank, self.epoch_index = num_replicas, rank, epoch_index
        self.epoch, self.consumed = 0, 0

    def total(self) -> int:
        """L: the positions of one epoch over all ranks."""
        return math.ceil(self.size / self.num_replicas) * self.num_replicas

    def order(self, epoch: int) -> list[int]:
        """perm_e: the epoch's order of the ``size`` items."""
        if not self.shuffle:
            return list(range(self.size))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=gen).tolist()

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at each epoch start; a new epoch starts at position 0."""
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def __len__(self) -> int:
        return self.total() // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        """The rest of this epoch for this rank; the next iterator starts the epoch afresh."""
        perm, start = self.order(self.epoch), self.consumed
        self.consumed, offset = 0, self.epoch * self.size if self.epoch_index else 0
        return iter([offset + perm[p % self.size] for p in range(start + self.rank, self.total(), self.num_replicas)])

    def state_dict(self, consumed: int) -> dict[str, Any]:
        """The state after ``consumed`` positions (all ranks together) of the current epoch."""
        return {"seed": self.seed, "size": self.size, "shuffle": self.shuffle, "epoch": self.epoch,
                "consumed": consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; a finished epoch continues at the start of the next one."""
        mine = {"seed": self.seed, "size": self.size, "shuffle": self.shuffle}
        theirs = {k: state[k] for k in mine}
        if theirs != mine:
            raise ValueError(f"cannot resume the data order: the checkpoint's sampler has {theirs}, "
                             f"this run's has {mine} (same data set, seed and shuffle expected)")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        if self.consumed >= self.total():
            self.epoch, self.consumed = self.epoch + 1, 0
