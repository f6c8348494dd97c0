"""Rollouts and per-token log-probs for the RL stages.

- :func:`sample_rollouts`: G completions per prompt from one ``generate`` call (KV cache, image
  tokens suppressed), returned as a :class:`Rollout` whose prompt inputs are repeated per
  completion, so every later forward pass sees one row per completion.
- :func:`completion_logprobs`: one forward over prompt + completion (with the images); logits
  sliced to the completion positions; ``log_softmax`` gathered at the sampled tokens; masked.
  Optionally the entropy and the LM's last hidden state (for a value head) at the same positions.
- :class:`ReferencePolicy`: the KL anchor. Under LoRA the same model with the adapter off (no
  second copy); otherwise a frozen deep copy made once.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from unveil.models.generation import MODEL_INPUT_KEYS, generate, model_inputs
from unveil.rewards.base import RolloutBatch

# Tensors with one entry per image (or per image patch row, for Qwen2-VL style inputs).
_PER_IMAGE = ("pixel_values", "image_sizes", "image_grid_thw")
# Tensors with one entry per prompt token besides input_ids / attention_mask.
_PER_TOKEN = ("mm_token_type_ids", "token_type_ids")


def _image_rows(inputs: dict, n_images: list[int]) -> dict[str, list[int]] | None:
    """For each per-image tensor, how many of its rows belong to each sample (None = per sample)."""
    out = {}
    total = sum(n_images)
    for key in _PER_IMAGE:
        v = inputs.get(key)
        if v is None:
            continue
        if key == "pixel_values" and inputs.get("image_grid_thw") is not None:
            per_image = inputs["image_grid_thw"].prod(-1).tolist()  # patch rows per image
            rows, k = [], 0
            for n in n_images:
                rows.append(int(sum(per_image[k : k + n])))
                k += n
            out[key] = rows
        elif key == "pixel_values" and v.dim() == 5:
            continue  # [B, n_images, C, H, W] (Idefics3 / SmolVLM): per sample
        elif v.shape[0] == total:
            out[key] = list(n_images)
        elif v.shape[0] != len(n_images):
            raise ValueError(f"cannot align {key} {tuple(v.shape)} with {len(n_images)} samples / {total} images")
    return out


def select_inputs(inputs: dict, rows: list[int] | torch.Tensor, n_images: list[int]) -> dict:
    """Model inputs for the sample rows ``rows`` (repeats allowed): per-sample tensors are indexed,
    per-image tensors (pixel values, sizes, grids) are gathered by each sample's images."""
    rows = torch.as_tensor(rows, dtype=torch.long).tolist()
    per_image = _image_rows(inputs, n_images)
    out = {}
    for key, v in inputs.items():
        if key not in MODEL_INPUT_KEYS or v is None:
            continue
        if key in per_image:
            chunks = torch.split(v, per_image[key], dim=0)
            out[key] = torch.cat([chunks[r] for r in rows], dim=0)
        else:
            out[key] = v[torch.as_tensor(rows, device=v.device)]
    return out


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
        """The completions ``idx`` (a minibatch)."""
        idx_t = torch.as_tensor(idx, dtype=torch.long)
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
        elif key == "attention_mask" or key in _PER_TOKEN:
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
) -> Rollout:
    """G completions per prompt of a :class:`PromptCollator` batch, from one ``generate`` call."""
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


@dataclass
class LogProbs:
    logps: torch.Tensor  # [N, T] log-prob of each sampled completion token, 0 where masked
    entropy: torch.Tensor | None = None  # [N, T] entropy of the next-token distribution
    hidden: torch.Tensor | None = None  # [N, T, H] last hidden state at the positions predicting each token


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as ``generate`` makes them for left-padded rows (cumsum of the mask - 1)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def _forward_logprobs(
    model,
    inputs: dict,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    with_hidden: bool,
) -> LogProbs:
    T = completion_ids.shape[1]
    fwd = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    input_ids = torch.cat([inputs["input_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["attention_mask"], completion_mask.to(inputs["attention_mask"].dtype)], dim=1)
    for k in _PER_TOKEN:  # per-token type ids (Qwen2-VL: 0 = text, 1 = image): the completion is text
        if fwd.get(k) is not None:
            fwd[k] = torch.cat([fwd[k], fwd[k].new_zeros(fwd[k].shape[0], T)], dim=1)
    if "image_grid_thw" not in inputs:  # M-RoPE models (Qwen2-VL) build their own positions
        fwd["position_ids"] = position_ids_from_mask(attention_mask)
    hidden: list[torch.Tensor] = []
    handle = None
    if with_hidden:  # the LM head's input is the final (normed) hidden state of the kept positions
        head = _base(model).get_output_embeddings()
        handle = head.register_forward_pre_hook(lambda _m, args: hidden.append(args[0]))
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=T + 1, use_cache=False, **fwd)
    finally:
        if handle is not None:
            handle.remove()
    logits = out.logits[:, -(T + 1) : -1, :].float()  # position j predicts token j + 1
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    mask = completion_mask.to(logp_all.dtype)
    logps = logp_all.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) * mask
    entropy = -(logp_all.exp() * logp_all).sum(-1) * mask if with_entropy else None
    h = hidden[-1][:, -(T + 1) : -1, :] if with_hidden else None
    return LogProbs(logps=logps, entropy=entropy, hidden=h)


def completion_logprobs(
    model,
    rollout: Rollout,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_hidden: bool = False,
    chunk_size: int | None = None,
) -> LogProbs:
    """Per-token log-probs of the rollout's completions under ``model`` (grad flows if enabled).

    ``chunk_size`` bounds the rows of one forward pass (memory); results are concatenated.
    """
    n = len(rollout)
    if not chunk_size or chunk_size >= n:
        return _forward_logprobs(
            model,
            rollout.inputs,
            rollout.completion_ids,
            rollout.completion_mask,
            temperature,
            with_entropy,
            with_hidden,
        )
    parts = []
    for s in range(0, n, chunk_size):
        sub = rollout.select(list(range(s, min(n, s + chunk_size))))
        parts.append(
            _forward_logprobs(
                model, sub.inputs, sub.completion_ids, sub.completion_mask, temperature, with_entropy, with_hidden
            )
        )

    def cat(name: str) -> torch.Tensor | None:
        return torch.cat([getattr(p, name) for p in parts]) if getattr(parts[0], name) is not None else None

    return LogProbs(logps=cat("logps"), entropy=cat("entropy"), hidden=cat("hidden"))


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class ReferencePolicy:
    """The frozen policy the KL term anchors to.

    Under LoRA it is the policy itself with the adapter disabled (no memory cost); otherwise a
    deep copy taken once (at stage setup: after ``model.init_from``, before any update or
    checkpoint restore), frozen and in eval mode. The copy is not an ``nn.Module`` attribute of
    the stage, so it is neither optimised nor saved.
    """

    def __init__(self, model: torch.nn.Module):
        self.policy = model
        self.adapter_off = is_peft(model)
        self.copy = None
        if not self.adapter_off:
            self.copy = copy.deepcopy(model).eval().requires_grad_(False)

    def to(self, device) -> ReferencePolicy:
        if self.copy is not None:
            self.copy.to(device)
        return self

    @contextlib.contextmanager
    def model(self):
        if self.adapter_off:
            with self.policy.disable_adapter():
                yield self.policy
        else:
            yield self.copy

    @torch.no_grad()
    def logprobs(self, rollout: Rollout, temperature: float = 1.0, chunk_size: int | None = None) -> torch.Tensor:
        with self.model() as m:
            return completion_logprobs(m, rollout, temperature, chunk_size=chunk_size).logps


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 so the policy's log-probs are deterministic (ratio = 1
    before the first update), as TRL's ``disable_dropout``."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
