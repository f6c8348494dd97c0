"""A weighted sampler whose place in the epoch is part of a checkpoint.

The training loader is torchdata's ``StatefulDataLoader``: Lightning stores its state in every
checkpoint, so a run resumed mid-epoch sees the batches the uninterrupted run would have seen next,
instead of starting the epoch over. Its own random sampler (``shuffle=True``) is stateful already;
this is the same for ``data.task_weights``: draws with replacement, in proportion to the weights.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class _WeightedIterator:
    def __init__(self, sampler: "ResumableWeightedSampler"):
        self.sampler = sampler
        self.generator_state = sampler.generator.get_state()  # the epoch's draw is made from this state
        self.order = self._draw()
        self.yielded = 0

    def _draw(self) -> list[int]:
        s = self.sampler
        return torch.multinomial(s.weights, s.num_samples, replacement=True, generator=s.generator).tolist()

    def __iter__(self):
        return self

    def __next__(self) -> int:
        if self.yielded >= len(self.order):
            raise StopIteration
        self.yielded += 1
        return self.order[self.yielded - 1]

    def state_dict(self) -> dict:
        return {"generator": self.generator_state, "yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        self.generator_state = state["generator"]
        self.sampler.generator.set_state(self.generator_state)
        self.order, self.yielded = self._draw(), int(state["yielded"])


class ResumableWeightedSampler(Sampler[int]):
    """``WeightedRandomSampler(replacement=True)`` whose iterator saves and restores its place."""

    def __init__(self, weights: torch.Tensor, num_samples: int, generator: torch.Generator):
        w = torch.as_tensor(weights, dtype=torch.double)
        if w.ndim != 1 or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError("data.task_weights: sample weights must be finite, >= 0 and not all 0")
        self.weights, self.num_samples, self.generator = w, int(num_samples), generator

    def __iter__(self) -> Iterator[int]:
        return _WeightedIterator(self)

    def __len__(self) -> int:
        return self.num_samples
