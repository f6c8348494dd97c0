"""Training samplers whose place in the epoch is part of a checkpoint.

The training loader is torchdata's ``StatefulDataLoader``: Lightning stores its state in every
checkpoint, so a run resumed mid-epoch sees the batches the uninterrupted run would have seen next,
instead of starting the epoch over. A sampler takes part through an iterator with
``state_dict``/``load_state_dict``: the generator state the epoch's order was drawn from, and how
far into it the loader got.

- :class:`ResumableRandomSampler` (shuffling) draws the same orders as torch's ``RandomSampler``
  with the same generator, so runs keep the data order they had before checkpoints held it.
  (torchdata's own sampler draws its permutation before the loader draws its base seed from the
  shared generator, which changes every order.)
- :class:`ResumableWeightedSampler`: ``data.task_weights``, draws with replacement in proportion
  to the weights, as ``WeightedRandomSampler`` does.

Under DDP each rank draws the same order from the same seed and takes its share (every
``world``-th index, the order padded to a multiple of ``world`` as ``DistributedSampler`` pads).
Both are ``DistributedSampler`` subclasses, so Lightning leaves them in place rather than putting
its own sampler, which saves no place, in theirs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DistributedSampler


class _ResumableIterator:
    """Draws the epoch's order lazily, on the first ``next``, as torch's samplers do (the loader
    draws its base seed from the same generator in between)."""

    def __init__(
        self, sampler: _ShardedSampler, draw: Callable[[], list[int]], finish: Callable[[], object] | None = None
    ):
        self.sampler, self.draw, self.generator, self.finish = sampler, draw, sampler.generator, finish
        self.generator_state: torch.Tensor | None = None
        self.order: list[int] | None = None
        self.yielded = 0

    def _shard(self) -> list[int]:
        return self.sampler.shard(self.draw())

    def __iter__(self):
        return self

    def __next__(self) -> int:
        if self.order is None:
            self.generator_state = self.generator.get_state()
            self.order = self._shard()
        if self.yielded >= len(self.order):
            if self.finish is not None and self.yielded == len(self.order):
                self.yielded += 1  # once per epoch
                self.finish()
            raise StopIteration
        self.yielded += 1
        return self.order[self.yielded - 1]

    def state_dict(self) -> dict:
        state = self.generator_state if self.order is not None else self.generator.get_state()
        return {"generator": state, "yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.generator_state, self.order, self.yielded = state["generator"], self._shard(), int(state["yielded"])


class _ShardedSampler(DistributedSampler):
    """This rank's share of an order drawn from ``generator`` (all of it when ``world`` is 1)."""

    def __init__(self, data_source, generator: torch.Generator, rank: int = 0, world: int = 1):
        # explicit rank and world: no process group is needed to build one
        super().__init__(data_source, num_replicas=int(world), rank=int(rank), shuffle=True, drop_last=False)
        self.data_source, self.generator = data_source, generator

    def shard(self, order: list[int]) -> list[int]:
        if self.num_replicas == 1:
            return order
        total = math.ceil(len(order) / self.num_replicas) * self.num_replicas
        padded = (order * math.ceil(total / max(1, len(order))))[:total]
        return padded[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        return math.ceil(self._draws() / self.num_replicas)

    def _draws(self) -> int:
        return len(self.data_source)


class ResumableRandomSampler(_ShardedSampler):
    """A permutation of ``data_source`` per epoch (no replacement), with a checkpointable place."""

    def __iter__(self) -> Iterator[int]:
        perm = lambda: torch.randperm(len(self.data_source), generator=self.generator).tolist()  # noqa: E731
        # torch's sampler draws one more (empty) permutation when an epoch runs out: so do we
        return _ResumableIterator(self, perm, finish=perm)


class ResumableWeightedSampler(_ShardedSampler):
    """``WeightedRandomSampler(replacement=True)`` whose iterator saves and restores its place."""

    def __init__(
        self, weights: torch.Tensor, num_samples: int, generator: torch.Generator, rank: int = 0, world: int = 1
    ):
        w = torch.as_tensor(weights, dtype=torch.double)
        if w.ndim != 1 or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError("data.task_weights: sample weights must be finite, >= 0 and not all 0")
        super().__init__(range(len(w)), generator, rank, world)
        self.weights, self.draw_count = w, int(num_samples)

    def _draws(self) -> int:
        return self.draw_count

    def __iter__(self) -> Iterator[int]:
        def draw() -> list[int]:
            return torch.multinomial(self.weights, self.draw_count, True, generator=self.generator).tolist()

        return _ResumableIterator(self, draw)
