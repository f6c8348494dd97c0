"""The one rollout type: N = P x G sampled completions of P prompts, aligned per completion.

RL stages sample it (:func:`unveil.stages.rollout.sample_rollouts`), the reward heads score it and
the losses read its log-probs (:meth:`Rollout.logprobs`, the prompt run once per group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from unveil.models.inputs import select_inputs
from unveil.models.policy import LogProbs, completion_logprobs


@dataclass
class Rollout:
    """N = P * G completions; everything aligned per completion."""

    texts: list[str]  # decoded completions
    samples: list[Any]  # the prompt's Sample, per completion
    group: torch.Tensor  # [N] prompt index of each completion
    # What the policy ran on and sampled; None for text only (heads that read text, tests)
    inputs: dict[str, torch.Tensor] | None = None  # prompt model inputs, one row per completion (left-padded)
    completion_ids: torch.Tensor | None = None  # [N, T] (right-padded after EOS)
    completion_mask: torch.Tensor | None = None  # [N, T] 1 on real tokens, EOS included
    extra: dict[str, Any] = field(default_factory=dict)  # per-stage tensors [N, ...] (logps, values, ...)
    # model outputs computed once and shared by the reward heads that need them (keyed by producer)
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def n_images(self) -> list[int]:
        return [len(s.images) for s in self.samples]

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(1)

    def select(self, idx: torch.Tensor | list[int]) -> Rollout:
        """The completions ``idx`` (a minibatch); the rollout itself when that is all of it, in order."""
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        if idx_t.numel() == len(self) and torch.equal(idx_t.cpu(), torch.arange(len(self))):
            return self  # no copy of the (per-completion) prompt inputs and images
        il = idx_t.tolist()
        rows = lambda t: None if t is None else t[idx_t.to(t.device)]  # noqa: E731
        return Rollout(
            inputs=None if self.inputs is None else select_inputs(self.inputs, il, self.n_images),
            completion_ids=rows(self.completion_ids),
            completion_mask=rows(self.completion_mask),
            texts=[self.texts[i] for i in il],
            samples=[self.samples[i] for i in il],
            group=self.group[idx_t.to(self.group.device)],
            extra={
                k: (v[idx_t.to(v.device)] if torch.is_tensor(v) else [v[i] for i in il]) for k, v in self.extra.items()
            },
        )

    def to(self, device) -> Rollout:
        """The same completions with every tensor on ``device``."""
        move = lambda v: v.to(device) if torch.is_tensor(v) else v  # noqa: E731
        return Rollout(
            inputs=None if self.inputs is None else {k: move(v) for k, v in self.inputs.items()},
            completion_ids=move(self.completion_ids),
            completion_mask=move(self.completion_mask),
            texts=list(self.texts),
            samples=list(self.samples),
            group=move(self.group),
            extra={k: move(v) for k, v in self.extra.items()},
        )

    def state(self) -> dict[str, Any]:
        """Plain tensors, strings and numbers (Samples as dicts) on the CPU: what a checkpoint
        holds, and what ``torch.load(weights_only=True)`` gives back."""
        ro = self.to("cpu")
        return {
            "inputs": dict(ro.inputs or {}),
            "completion_ids": ro.completion_ids,
            "completion_mask": ro.completion_mask,
            "texts": ro.texts,
            "samples": [s.to_dict() for s in ro.samples],
            "group": ro.group,
            "extra": dict(ro.extra),
        }

    @staticmethod
    def from_state(state: dict[str, Any]) -> Rollout:
        from unveil.data.schema import Sample

        return Rollout(
            inputs=dict(state["inputs"]) or None,
            completion_ids=state["completion_ids"],
            completion_mask=state["completion_mask"],
            texts=list(state["texts"]),
            samples=[Sample.from_dict(d) for d in state["samples"]],
            group=state["group"],
            extra=dict(state["extra"]),
        )

    def logprobs(
        self, model, temperature: float = 1.0, share_prompt: bool = True, chunk_size: int | None = None, **kw
    ) -> LogProbs:
        """Per-token log-probs of the completions under ``model`` (grad flows if enabled); with
        ``share_prompt`` the vision tower and the prompt run once per group of completions."""
        return completion_logprobs(
            model,
            self.inputs,
            self.completion_ids,
            self.completion_mask,
            group=self.group if share_prompt else None,
            n_images=self.n_images,
            temperature=temperature,
            chunk_size=chunk_size,
            **kw,
        )
