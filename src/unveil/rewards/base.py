"""The reward-head contract (docs/architecture.md#reward-heads). Shared by the RL stages and every head.

A head is a small object with a ``name``, the set of things it ``needs`` and a call that takes a
:class:`RolloutBatch` and returns one finite float per completion, or NaN where the head does
not apply (e.g. localisation on a closed question). A head never raises on model text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from unveil.data.schema import Sample

# What a head may need; the stage provides it on the batch.
NEEDS = ("text", "model", "judge")


@dataclass
class RolloutBatch:
    """N completions of P prompts (N = P * G). Everything is aligned per completion."""

    samples: list[Sample]  # the prompt's Sample, repeated for each of its completions
    completions: list[str]  # decoded completion texts
    group: torch.Tensor  # [N] long: index of the prompt each completion answers
    completion_ids: torch.Tensor | None = None  # [N, T] generated token ids (right-padded)
    completion_mask: torch.Tensor | None = None  # [N, T] 1 on real completion tokens
    prompt_inputs: dict[str, torch.Tensor] | None = None  # processor outputs per completion (left-padded)
    backbone: Any = None  # unveil.models.Backbone, for heads that run the model
    vocab: list[str] = field(default_factory=list)  # finding labels the parser looks for
    # Shared lazily-computed model outputs (e.g. attentions of one forward pass), so two heads
    # that need the same forward pass do not each run it. Keyed by the producer's name.
    cache: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completions)


class RewardHead:
    name: ClassVar[str] = "base"
    needs: ClassVar[frozenset[str]] = frozenset({"text"})

    def __call__(self, batch: RolloutBatch) -> torch.Tensor:
        """[N] float32 scores: finite, or NaN where the head does not apply."""
        raise NotImplementedError


@dataclass
class RewardOutput:
    """What the composite returns to an RL stage."""

    total: torch.Tensor  # [N] weighted sum of group-normalised head scores (NaN counts as 0)
    per_head: dict[str, torch.Tensor]  # raw head scores [N], NaN where a head does not apply
    stats: dict[str, float]  # TRL's names: rewards/<head>/mean, rewards/<head>/std, ..., reward, reward_std
