"""The rollout-engine interface: G completions per prompt of a prompt batch, and a weight sync."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampled:
    """What an engine returns for P prompts x G completions (rows prompt-major: prompt i's G
    completions are rows i*G .. i*G+G-1)."""

    completion_ids: torch.Tensor  # [N, T] right-padded with the pad id after EOS
    completion_mask: torch.Tensor  # [N, T] 1 on real tokens, EOS included
    texts: list[str]  # decoded completions
    sampler_logps: torch.Tensor | None = None  # [N, T] the sampler's log-prob of each token; None = the policy's own


class RolloutEngine:
    """Base class. ``sample`` draws the completions; ``sync`` makes the engine sample from the
    policy's current weights (called before each rollout with the optimiser step count, so an
    engine pushes weights once per change, not once per rollout)."""

    def sample(
        self,
        backbone,
        batch: dict,
        num_generations: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        share_prompt: bool = True,
    ) -> Sampled:
        raise NotImplementedError

    def sync(self, backbone, step: int) -> None:
        """Load the policy's weights at optimiser step ``step`` into the engine (no-op by default)."""

    def close(self) -> None:
        """Free what the engine holds (a server it started, an engine's memory)."""


def pad_completions(rows: list[list[int]], logps: list[list[float]] | None, eos_id: int, pad_id: int) -> Sampled:
    """Token-id lists (and their log-probs) as right-padded tensors; the mask covers each row up to
    and including its first EOS, as :func:`unveil.models.generation.generate`'s does."""
    width = max(1, max((len(r) for r in rows), default=1))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lp = torch.zeros((len(rows), width), dtype=torch.float32) if logps is not None else None
    for i, r in enumerate(rows):
        end = r.index(eos_id) + 1 if eos_id in r else len(r)
        ids[i, :end] = torch.tensor(r[:end], dtype=torch.long)
        mask[i, :end] = 1
        if lp is not None:
            lp[i, :end] = torch.tensor(logps[i][:end], dtype=torch.float32)
    return Sampled(completion_ids=ids, completion_mask=mask, texts=[], sampler_logps=lp)
