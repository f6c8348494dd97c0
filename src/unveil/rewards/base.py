"""The reward-head contract (docs/architecture.md#reward-heads). Shared by the RL stages and every head.

A head is a small object with a ``name``, the set of things it ``needs`` and a call that takes the
one rollout type (:class:`unveil.models.rollout.Rollout`) and returns one finite float per
completion, or NaN where the head does not apply (e.g. localisation on a closed question). A head
never raises on model text. The backbone and the finding vocabulary are bound to every head once,
when the composite is built (:meth:`RewardHead.bind`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from unveil.models.rollout import Rollout

__all__ = ["NEEDS", "RewardHead", "RewardOutput", "Rollout"]

# What a head may need: the text, the model (bound backbone + the rollout's inputs), a judge.
NEEDS = ("text", "model", "judge")


class RewardHead:
    name: ClassVar[str] = "base"
    needs: ClassVar[frozenset[str]] = frozenset({"text"})
    # bound once, when the composite is built (:meth:`bind`): the policy's backbone (its box format,
    # tokenizer, model) and the data set's finding labels
    backbone: Any = None
    vocab: tuple[str, ...] = ()

    def bind(self, backbone: Any = None, vocab=None) -> RewardHead:
        self.backbone, self.vocab = backbone, tuple(vocab or ())
        return self

    def __call__(self, batch: Rollout) -> torch.Tensor:
        """[N] float32 scores: finite, or NaN where the head does not apply."""
        raise NotImplementedError


@dataclass
class RewardOutput:
    """What the composite returns to an RL stage."""

    total: torch.Tensor  # [N] weighted sum of group-normalised head scores (NaN counts as 0)
    per_head: dict[str, torch.Tensor]  # raw head scores [N], NaN where a head does not apply
    stats: dict[str, float]  # TRL's names: rewards/<head>/mean, rewards/<head>/std, ..., reward, reward_std
