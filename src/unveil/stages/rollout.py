"""Rollouts for the RL stages (the type itself: :class:`unveil.models.rollout.Rollout`).

- :func:`sample_rollouts`: G completions per prompt from one ``generate`` call (KV cache, image
  tokens suppressed), returned as a :class:`Rollout` whose prompt inputs are repeated per
  completion (one row per completion) and whose ``group`` says which rows share a prompt.
- :func:`concat_rollouts`: one rollout from several (GRPO's held groups).
"""

from __future__ import annotations

import torch

from unveil.models.inputs import PER_TOKEN, model_inputs, select_inputs
from unveil.models.rollout import Rollout

__all__ = ["Rollout", "concat_rollouts", "sample_rollouts"]


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
    engine=None,
) -> Rollout:
    """G completions per prompt of a :class:`PromptCollator` batch, from one ``generate`` call
    (the prompts prefilled once, their KV cache repeated G times, with ``share_prompt``), or from
    a rollout ``engine`` (:mod:`unveil.engines`; sampling only), whose sampler log-probs, when it
    reports them, land in ``extra["sampler_logps"]`` for the importance-sampling correction."""
    samples = batch["samples"]
    if engine is None:
        from unveil.engines.hf import HFEngine

        engine = HFEngine(do_sample=do_sample)
    s = engine.sample(backbone, batch, num_generations, max_new_tokens, temperature, top_p, top_k, share_prompt)
    out = {"completion_ids": s.completion_ids, "completion_mask": s.completion_mask, "texts": s.texts}
    device = batch["input_ids"].device
    out = {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}
    if s.sampler_logps is not None:
        out["sampler_logps"] = s.sampler_logps.to(device)
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
        extra={"sampler_logps": out["sampler_logps"]} if "sampler_logps" in out else {},
    )
