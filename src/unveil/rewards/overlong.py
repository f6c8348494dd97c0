"""Overlong penalty: DAPO's soft length punishment (Yu et al. 2025, section 3.4).

A completion cut off at the generation limit has no proper ending, yet it can still score well on
the other heads (a truncated answer may already hold its box). DAPO found that rewarding such
completions adds noise, and that a hard -1 for truncation is too sharp. It ramps the penalty in
over the last ``cache`` tokens before the limit::

    0                              if |y| <= max_len - cache
    ((max_len - cache) - |y|) / cache   if max_len - cache < |y| <= max_len
    -1                             if |y| > max_len

``|y|`` is the number of generated tokens (``completion_mask``). A batch that carries only texts
falls back to the backbone tokenizer's count. ``max_len`` defaults to the stage's
``max_new_tokens`` in ``conf/reward/overlong.yaml``, so a completion at the limit scores -1.
Scores are in [-1, 0]. Add it to a preset with weight 1 and ``norm: none``, as DAPO adds it to the
task reward: ``reward=[umed,overlong]``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from unveil.rewards._common import applies, per_sample, task_set
from unveil.rewards.base import RewardHead, Rollout


class OverlongReward(RewardHead):
    name: ClassVar[str] = "overlong"
    needs: ClassVar[frozenset[str]] = frozenset({"text"})

    def __init__(self, max_len: int, cache: int = 16, tasks: list[str] | str | None = None):
        if int(max_len) < 1 or not 0 < int(cache) <= int(max_len):
            raise ValueError(
                f"overlong: need max_len >= 1 and 0 < cache <= max_len, got max_len={max_len}, cache={cache}"
            )
        self.max_len, self.cache = int(max_len), int(cache)
        self.tasks = task_set(tasks)

    def penalty(self, n_tokens: int) -> float:
        free = self.max_len - self.cache
        if n_tokens <= free:
            return 0.0
        if n_tokens > self.max_len:
            return -1.0
        return (free - n_tokens) / self.cache

    def _length(self, batch: Rollout, i: int) -> int:
        if batch.completion_mask is not None:
            return int(batch.completion_mask[i].sum())
        tok = getattr(self.backbone, "tokenizer", None)
        if tok is None:  # scored NaN by per_sample, with one warning
            raise ValueError("the batch has neither completion_mask nor a backbone tokenizer to count tokens with")
        text = batch.texts[i]
        return len(tok(text if isinstance(text, str) else "", add_special_tokens=False)["input_ids"])

    def __call__(self, batch: Rollout) -> torch.Tensor:
        def one(i: int) -> float:
            if not applies(self.tasks, batch.samples[i].task):
                return float("nan")
            return self.penalty(self._length(batch, i))

        return per_sample(self.name, one, len(batch))
