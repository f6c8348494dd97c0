"""Training samplers whose place in the epoch is part of a checkpoint.

The training loader is torchdata's ``StatefulDataLoader``: Lightning stores its state in every
checkpoint, so a run resumed mid-epoch sees the batches the uninterrupted run would have seen next,
instead of starting the epoch over. A sampler takes part through an iterator with
``state_dict``/``load_state_dict``: the generator state the epoch's order was drawn from, and how
far into it the loader got.

- :class:`ResumableRandomSampler` (shuffling) draws the same orders as torch's ``RandomSampler``
  with the same generator, so runs keep the data order they had before checkpoints held it.
  (torchdata's own sampler draws its permutation before the loader draws its base seed from the
  shared generator, which changes every order.) Being a ``RandomSampler``, Lightning still swaps
  it for a ``DistributedSampler`` under DDP.
- :class:`ResumableWeightedSampler`: ``data.task_weights``, draws with replacement in proportion
  to the weights, as ``WeightedRandomSampler`` does.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import RandomSampler, Sampler


class _ResumableIterator:
    """Draws the epoch's order lazily, on the first ``next``, as torch's samplers do (the loader
    draws its base seed from the same generator in between)."""

    def __init__(self, draw: Callable[[], list[int]], generator: torch.Generator,
                 finish: Callable[[], object] | None = None):
        self.draw, self.generator, self.finish = draw, generator, finish
        self.generator_state: torch.Tensor | None = None
        self.order: list[int] | None = None
        self.yielded = 0

    def __iter__(self):
        return self

    def __next__(self) -> int:
        if self.order is None:
            self.generator_state = self.generator.get_state()
            self.order = self.draw()
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
        self.generator_state, self.order, self.yielded = state["generator"], self.draw(), int(state["yielded"])


class ResumableRandomSampler(RandomSampler):
    """``RandomSampler`` (no replacement) over ``data_source`` with a checkpointable place."""

    def __init__(self, data_source, generator: torch.Generator):
        super().__init__(data_source, generator=generator)

    def __iter__(self) -> Iterator[int]:
        perm = lambda: torch.randperm(len(self.data_source), generator=self.generator).tolist()  # noqa: E731
        # torch's sampler draws one more (empty) permutation when an epoch runs out: so do we
        return _ResumableIterator(perm, self.generator, finish=perm)


class ResumableWeightedSampler(Sampler[int]):
    """``WeightedRandomSampler(replacement=True)`` whose iterator saves and restores its place."""

    def __init__(self, weights: torch.Tensor, num_samples: int, generator: torch.Generator):
        w = torch.as_tensor(weights, dtype=torch.double)
        if w.ndim != 1 or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError("data.task_weights: sample weights must be finite, >= 0 and not all 0")
        self.weights, self.num_samples, self.generator = w, int(num_samples), generator

    def __iter__(self) -> Iterator[int]:
        draw = lambda: torch.multinomial(self.weights, self.num_samples, True, generator=self.generator).tolist()  # noqa: E731
        return _ResumableIterator(draw, self.generator)

    def __len__(self) -> int:
        return self.num_samples
