"""Rollouts for the RL stages: the one rollout type stages and reward heads share.

- :func:`sample_rollouts`: G completions per prompt from one ``generate`` call (KV cache, image
  tokens suppressed), returned as a :class:`Rollout` whose prompt inputs are repeated per
  completion (one row per completion) and whose ``group`` says which rows share a prompt.
- :meth:`Rollout.logprobs`: the completions' per-token log-probs under a model, through
  :func:`unveil.models.policy.completion_logprobs`, with the prompt run once per group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from unveil.models.generation import generate
from unveil.models.inputs import PER_TOKEN, model_inputs, select_inputs
from unveil.models.policy import LogProbs, completion_logprobs
from unveil.rewards.base import RolloutBatch


@dataclass
class Rollout:
    """N = P * G completions; everything aligned per completion."""

    inputs: dict[str, torch.Tensor]  # prompt model inputs, one row per completion (left-padded)
    completion_ids: torch.Tensor  # [N, T] (right-padded after EOS)
    completion_mask: torch.Tensor  # [N, T] 1 on real tokens, EOS included
    texts: list[str]
    samples: list[Any]  # the prompt's Sample, per completion
    group: torch.Tensor  # [N] prompt index of each completion
    extra: dict[str, Any] = field(default_factory=dict)  # per-stage tensors [N, ...] (logps, values, ...)

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
        dev = self.completion_ids.device
        return Rollout(
            inputs=select_inputs(self.inputs, il, self.n_images),
            completion_ids=self.completion_ids[idx_t.to(dev)],
            completion_mask=self.completion_mask[idx_t.to(dev)],
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
            inputs={k: move(v) for k, v in self.inputs.items()},
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
            "inputs": dict(ro.inputs),
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
            inputs=dict(state["inputs"]),
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

    def reward_batch(self, backbone=None, vocab: list[str] | None = None) -> RolloutBatch:
        return RolloutBatch(
            samples=self.samples,
            completions=self.texts,
            group=self.group,
            completion_ids=self.completion_ids,
            completion_mask=self.completion_mask,
            prompt_inputs=self.inputs,
            backbone=backbone,
            vocab=list(vocab or []),
        )


def _pad_to(t: torch.Tensor, length: int, value, left: bool) -> torch.Tensor:
    pad = length - t.shape[1]
    if pad <= 0:
        return t
    block = t.new_full((t.shape[0], pad, *t.shape[2:]), value)
    return torch.cat([block, t] if left else [t, block], dim=1)


def concat_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """One rollout from several (each with its own groups): prompts re-padded on the left,
    completions (and per-token extras) on the right, group ids kept distinct."""
    if len(parts) == 1:
        return parts[0]
    seq_len = max(p.inputs["input_ids"].shape[1] for p in parts)
    inputs = {}
    for key in parts[0].inputs:
        vs = [p.inputs[key] for p in parts]
        if key == "input_ids":
            vs = [_pad_to(v, seq_len, pad_token_id, left=True) for v in vs]
        elif key == "attention_mask" or key in PER_TOKEN:
            vs = [_pad_to(v, seq_len, 0, left=True) for v in vs]
        elif len({tuple(v.shape[1:]) for v in vs}) > 1:
            raise ValueError(f"cannot concatenate rollouts: {key} shapes {[tuple(v.shape) for v in vs]} differ")
        inputs[key] = torch.cat(vs, dim=0)
    width = max(p.completion_ids.shape[1] for p in parts)
    groups, offset = [], 0
    for p in parts:
        groups.append(p.group + offset)
        offset += int(p.group.max()) + 1 if len(p) else 0
    extra = {}
    for key in parts[0].extra:
        vs = [p.extra[key] for p in parts]
        if torch.is_tensor(vs[0]):
            extra[key] = torch.cat([_pad_to(v, width, 0, left=False) if v.dim() > 1 else v for v in vs], dim=0)
        else:
            extra[key] = [x for v in vs for x in v]
    return Rollout(
        inputs=inputs,
        completion_ids=torch.cat([_pad_to(p.completion_ids, width, pad_token_id, left=False) for p in parts]),
        completion_mask=torch.cat([_pad_to(p.completion_mask, width, 0, left=False) for p in parts]),
        texts=[t for p in parts for t in p.texts],
        samples=[x for p in parts for x in p.samples],
        group=torch.cat(groups),
        extra=extra,
    )


def sample_rollouts(
    backbone,
    batch: dict,
    num_generations: int,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    do_sample: bool = True,
    share_prompt: bool = True,
) -> Rollout:
    """G completions per prompt of a :class:`PromptCollator` batch, from one ``generate`` call
    (the prompts prefilled once, their KV cache repeated G times, with ``share_prompt``)."""
    samples = batch["samples"]
    out = generate(
        backbone,
        batch,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_return_sequences=num_generations,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        share_prompt=share_prompt,
    )
    g = num_generations
    rows = torch.arange(len(samples)).repeat_interleave(g)  # generate() repeats each prompt G times in a row
    n_images = [len(s.images) for s in samples]
    inputs = select_inputs(model_inputs(batch), rows, n_images)
    return Rollout(
        inputs=inputs,
        completion_ids=out["completion_ids"],
        completion_mask=out["completion_mask"],
        texts=out["texts"],
        samples=[samples[i] for i in rows.tolist()],
        group=rows.to(out["completion_ids"].device),
    )
