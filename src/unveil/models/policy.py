"""Running the policy: the one home of every pass a stage or a reward head makes through the model.

- :func:`completion_logprobs`: ``log pi(y_t | x, y_<t)`` of sampled completions (GRPO, PPO, the
  reference, the counterfactual reward), optionally the entropy and the LM's last hidden state (a
  value head's input) at the same positions.
- :func:`answer_logprobs`: the same for the labelled answer tokens of whole sequences (DPO).
- :func:`key_mass`: the softmax mass that completion-token queries put on chosen keys, per layer
  and head (the vision-relevance reward), without attention maps.
- :class:`ReferencePolicy`, :func:`disable_dropout`, :func:`eval_mode`.

Functions take tensors (model inputs as the processor made them, completion ids and masks), never
stage objects. Three choices keep them affordable for a 7B backbone with ~1,000 image tokens:

1. **The prompt once per group.** Rows that share a prompt (``group``: G completions of one
   prompt) run the vision tower and the prompt once: the prompt's KV cache is computed for the P
   distinct prompts, indexed out to the N completions (gradients flow back through the index, so
   each prompt position receives the sum over its G completions, as in the unshared graph), and
   only the completion tokens run on top of it. Positions, M-RoPE included, are those of the
   unshared sequence. Under gradient checkpointing HF layers drop the cache, so a pass with
   gradients then runs unshared (no-grad passes run in eval mode and share).
2. **Only completion positions reach the LM head**, in chunks of at most ``LOGIT_CHUNK_BYTES`` of
   fp32 logits, recomputed in the backward instead of kept (:mod:`unveil.models.chunked_head`, whose
   chunks' weight gradients accumulate into one buffer). ``log p(y) = z_y - logsumexp(z)`` is gathered at the
   sampled token; the entropy ``H = logsumexp(z) - sum_v p_v z_v`` carries a graph only when asked.
3. **Attention mass without maps.** A registered attention function (``unveil_sdpa``: torch's
   sdpa, plus a capture when one is active) computes, for the completion-token queries only,
   ``sum_{j in keys} softmax_k(q . k_k * scale + mask)_j``: ``[layers, N, heads, T + 1]`` floats
   instead of ``[layers, N, heads, L, L]`` attention maps.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import logging
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from unveil.models.chunked_head import chunked_head_logprobs
from unveil.models.inputs import PER_TOKEN, select_inputs

log = logging.getLogger(__name__)

IGNORE = -100  # label of positions that are not trained on (prompt, padding)
# fp32 logits held at once by the log-prob head: 4 MiB is 6 tokens at Qwen's 151,936 vocabulary. A
# chunk reads the whole [V, H] head (~0.4 ms on an H100), so smaller chunks trade time for memory.
LOGIT_CHUNK_BYTES = 4 * 2**20
# Without gradients (reference, old policy, vision relevance) the completions run over a prompt's
# KV cache as many at a time as their copies of it fit in this budget: a copy is ~62 MiB at the
# Qwen2.5-VL-7B shape with 1,024 image tokens (2 at a time), a few KiB on the tiny model (all at once).
KV_COPY_BYTES = 128 * 2**20


@dataclass
class LogProbs:
    logps: torch.Tensor  # [N, T] log-prob of each sampled completion token, 0 where masked
    entropy: torch.Tensor | None = None  # [N, T] entropy of the next-token distribution, 0 where masked
    hidden: torch.Tensor | None = None  # [N, T, H] last hidden state at the positions predicting each token


# --- the model's parts ----------------------------------------------------------------------------


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The multimodal trunk (vision tower + projector + LM, ending in the final norm) and the LM head."""
    base = unwrap(model)
    body, head = getattr(base, "model", None), base.get_output_embeddings()
    if body is None or head is None:
        raise TypeError(f"{type(base).__name__}: expected a '.model' trunk and an output embedding (LM head)")
    return body, head


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as ``generate`` makes them for left-padded rows (cumsum of the mask - 1)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def _uses_mrope(inputs: dict) -> bool:
    return inputs.get("image_grid_thw") is not None  # Qwen2-VL / 2.5-VL: 3D positions from the image grids


def _rope_index(body, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE positions ``[3, B, L]`` of the prompts and each row's text offset ``[B, 1]``."""
    pos, deltas = body.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    return pos, deltas.reshape(-1, 1).to(pos.device)


def _can_share(model: torch.nn.Module) -> bool:
    """HF layers drop the KV cache under gradient checkpointing in training mode, with or without
    gradients (no-grad passes share when run in eval mode, as completion_logprobs runs them)."""
    base = unwrap(model)
    return not (model.training and getattr(base, "is_activation_checkpointing", False))


# --- hidden states at the completion positions ------------------------------------------------------


def _unshared_hidden(body, inputs: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor):
    """One pass over prompt + completion per row; hidden states of rows ``P-1 .. P+T-1``."""
    t = completion_ids.shape[1]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    ids = torch.cat([inputs["input_ids"], completion_ids], dim=1)
    am = torch.cat([inputs["attention_mask"], completion_mask.to(inputs["attention_mask"].dtype)], dim=1)
    for k in PER_TOKEN:  # per-token type ids (Qwen2-VL: 0 = text, 1 = image): the completion is text
        if extra.get(k) is not None:
            extra[k] = torch.cat([extra[k], extra[k].new_zeros(extra[k].shape[0], t)], dim=1)
    if not _uses_mrope(inputs):  # M-RoPE models build their own positions from the grids
        extra["position_ids"] = position_ids_from_mask(am)
    out = body(input_ids=ids, attention_mask=am, use_cache=False, **extra)
    return out.last_hidden_state[:, -(t + 1) :]


def prompt_rows(group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first row of each distinct prompt [P], the prompt of each row [N]) from group ids [N]."""
    uniq, inv = torch.unique(group.cpu(), return_inverse=True)
    first = torch.full((len(uniq),), len(group), dtype=torch.long).scatter_reduce(
        0, inv, torch.arange(len(group)), reduce="amin"
    )
    return first, inv


def _shared_hidden(
    body, inputs: dict, completion_ids, completion_mask, group: torch.Tensor, n_images: list[int], capture=None
):
    """The prompt once per group, then the completions on its KV cache; rows ``P-1 .. P+T-1``."""
    first, inv = prompt_rows(group)
    prompts = select_inputs(inputs, first, n_images)
    ids, am = prompts.pop("input_ids"), prompts.pop("attention_mask")
    dev = ids.device
    inv = inv.to(dev)
    if _uses_mrope(prompts):
        pos, deltas = _rope_index(body, {"input_ids": ids, "attention_mask": am, **prompts})
    else:
        pos, deltas = position_ids_from_mask(am), None
    if capture is not None:
        capture.shared = True
        capture.start(rows=1, weights=capture.weights[first.to(capture.weights.device), : ids.shape[1]])
    out = body(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True, **prompts)
    prefix, last = out.past_key_values, out.last_hidden_state[:, -1:]  # left-padded: the last column is real
    full_am = torch.cat([am[inv], completion_mask.to(am.dtype)], dim=1)
    cpos = position_ids_from_mask(full_am)[:, ids.shape[1] :]
    if deltas is not None:  # text positions continue from the prompt's last M-RoPE position
        cpos = cpos.unsqueeze(0).expand(3, -1, -1) + deltas[inv].view(1, -1, 1)
    # Each completion attends to its own copy of the prompt's keys and values. Without gradients the
    # completions run KV_COPY_BYTES' worth at a time (with gradients every copy is kept for the
    # backward anyway).
    n = len(inv)
    per_row = sum(layer.keys[0].nbytes + layer.values[0].nbytes for layer in prefix.layers)
    step = n if torch.is_grad_enabled() else max(1, KV_COPY_BYTES // max(1, per_row))
    hidden = []
    for lo in range(0, n, step):
        rows = slice(lo, lo + step)
        cache = _expand_cache(body, prefix, inv[rows])
        if capture is not None:
            capture.start(rows=completion_ids.shape[1], weights=capture.weights[rows])
        c = body(
            input_ids=completion_ids[rows],
            attention_mask=full_am[rows],
            position_ids=cpos[..., rows, :],
            past_key_values=cache,
        )
        hidden.append(c.last_hidden_state)
    return torch.cat([last[inv], torch.cat(hidden)], dim=1)


def _expand_cache(body, prefix, idx: torch.Tensor):
    """A cache holding, for each of ``idx``, a copy of that prompt's keys and values (autograd flows
    back into the prompt's)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=body.config)
    for i, layer in enumerate(prefix.layers):
        cache.update(layer.keys[idx], layer.values[idx], i)
    return cache


def completion_hidden(
    model, inputs: dict, ids: torch.Tensor, mask: torch.Tensor, group=None, n_images=None, capture=None
):
    """``[N, T + 1, H]`` final hidden states at positions ``P-1 .. P+T-1`` (row t predicts token t) of
    the completions ``ids`` / ``mask`` ``[N, T]`` after the prompts ``inputs`` (one row per completion).

    ``group`` [N] (rows with equal ids share their prompt inputs) and ``n_images`` (per row) turn on
    the shared prompt; without them, or where sharing cannot work, every row runs whole."""
    body, _ = body_and_head(model)
    if group is not None and n_images is not None and _can_share(model) and len(torch.unique(group)) < len(group):
        return _shared_hidden(body, inputs, ids, mask, group, n_images, capture)
    if capture is not None:
        capture.start(rows=ids.shape[1] + 1, weights=capture.weights)
    return _unshared_hidden(body, inputs, ids, mask)


# --- log-probs at the sampled tokens ----------------------------------------------------------------


def _chunk_logps(head, h, y, temperature: float, entropy: bool, entropy_grad: bool):
    logits = head(h).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = logits.logsumexp(-1)
    lp = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse
    ent = None
    if entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            ent = lse - (torch.softmax(logits, -1) * logits).sum(-1)
    return lp, ent


def token_logprobs(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log softmax(head(hidden) / temperature)`` at ``targets`` where ``mask``; ``[N, T]``, 0 elsewhere.

    Only masked-in positions reach the head, ``chunk_tokens`` at a time (default: ``LOGIT_CHUNK_BYTES``
    of fp32 logits); with gradients each chunk is checkpointed (its logits are recomputed in the
    backward pass, not kept)."""
    sel = mask.bool()
    h, y = hidden[sel], targets[sel].long()
    vocab = int(getattr(head, "out_features", None) or head.weight.shape[0])
    step = max(1, int(chunk_tokens or LOGIT_CHUNK_BYTES // (4 * vocab)))
    if type(head) is torch.nn.Linear and not entropy_grad:  # one weight-gradient buffer, not one per chunk
        lp, ent = chunked_head_logprobs(head, h, y, temperature, step, with_entropy)
        lps, ents = [lp], [ent]
    else:  # a wrapped head (e.g. PEFT's), or an entropy with a graph: each chunk checkpointed
        grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
        lps, ents = [], []
        for s in range(0, h.shape[0], step):
            args = (head, h[s : s + step], y[s : s + step], float(temperature), with_entropy, entropy_grad)
            lp, ent = checkpoint(_chunk_logps, *args, use_reentrant=False) if grad else _chunk_logps(*args)
            lps.append(lp)
            ents.append(ent)
    zeros = hidden.new_zeros(sel.shape, dtype=torch.float32)
    logps = zeros.masked_scatter(sel, torch.cat(lps)) if lps else zeros
    entropy = None
    if with_entropy:
        entropy = zeros.masked_scatter(sel, torch.cat(ents)) if ents else zeros
    return logps, entropy


def completion_logprobs(
    model,
    inputs: dict,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    group: torch.Tensor | None = None,
    n_images: list[int] | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    with_hidden: bool = False,
    chunk_size: int | None = None,
) -> LogProbs:
    """Per-token log-probs of completions under ``model`` (gradients flow if enabled).

    ``inputs``: the prompt's model inputs, one left-padded row per completion; ``completion_ids`` /
    ``completion_mask`` ``[N, T]`` right-padded. ``group`` + ``n_images``: see :func:`completion_hidden`.
    ``chunk_size`` bounds the completions of one forward pass (whole groups stay together)."""
    n = completion_ids.shape[0]
    if chunk_size and chunk_size < n:
        chunks = row_chunks(group, n, chunk_size)
        parts = [
            completion_logprobs(
                model,
                select_inputs(inputs, rows, n_images or [1] * n),
                completion_ids[rows],
                completion_mask[rows],
                None if group is None else group[rows.to(group.device)],
                None if n_images is None else [n_images[i] for i in rows.tolist()],
                temperature,
                with_entropy,
                entropy_grad,
                with_hidden,
            )
            for rows in chunks
        ]
        order = torch.cat(chunks).argsort()
        return _cat_logprobs(parts, order)
    # without gradients, under activation checkpointing, eval mode lets the prompt be shared (the
    # stages switch dropout off, so the log-probs are those of train mode)
    no_grad_ckpt = not torch.is_grad_enabled() and not _can_share(model)
    with eval_mode(model) if no_grad_ckpt else contextlib.nullcontext():
        hidden = completion_hidden(model, inputs, completion_ids, completion_mask, group, n_images)[:, :-1]
    _, head = body_and_head(model)
    logps, entropy = token_logprobs(
        head, hidden, completion_ids, completion_mask, temperature, with_entropy, entropy_grad
    )
    return LogProbs(logps=logps, entropy=entropy, hidden=hidden if with_hidden else None)


def row_chunks(group: torch.Tensor | None, n: int, size: int) -> list[torch.Tensor]:
    """Row indices in chunks of about ``size`` rows; rows of one group stay in one chunk."""
    if group is None:
        return [torch.arange(s, min(n, s + size)) for s in range(0, n, size)]
    _, inv = prompt_rows(group)
    chunks, cur, count = [], [], 0
    for g in torch.unique(inv).tolist():
        rows = torch.nonzero(inv == g).flatten()
        if cur and count + len(rows) > size:
            chunks.append(torch.cat(cur))
            cur, count = [], 0
        cur.append(rows)
        count += len(rows)
    if cur:
        chunks.append(torch.cat(cur))
    return chunks


def _cat_logprobs(parts: list[LogProbs], order: torch.Tensor) -> LogProbs:
    def cat(name: str) -> torch.Tensor | None:
        if getattr(parts[0], name) is None:
            return None
        width = max(getattr(p, name).shape[1] for p in parts)
        padded = [torch.nn.functional.pad(getattr(p, name), _pad_spec(getattr(p, name), width)) for p in parts]
        return torch.cat(padded)[order.to(padded[0].device)]

    return LogProbs(logps=cat("logps"), entropy=cat("entropy"), hidden=cat("hidden"))


def _pad_spec(t: torch.Tensor, width: int) -> tuple[int, ...]:
    return (0, 0) * (t.dim() - 2) + (0, width - t.shape[1])


def answer_logprobs(model, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the labelled tokens of whole sequences: (per-token log-probs, mask), both
    ``[rows, L']`` from the first labelled position on (DPO's chosen and rejected answers)."""
    body, head = body_and_head(model)
    targets = labels[:, 1:]  # token t+1 is predicted at position t
    first = int((targets != IGNORE).any(0).int().argmax())
    fwd = dict(inputs)
    if not _uses_mrope(fwd):
        fwd["position_ids"] = position_ids_from_mask(fwd["attention_mask"])
    hidden = body(**fwd, use_cache=False).last_hidden_state[:, first:-1]
    targets = targets[:, first:]
    mask = targets != IGNORE
    logps, _ = token_logprobs(head, hidden, targets.clamp(min=0), mask)
    return logps, mask


# --- attention mass on chosen keys --------------------------------------------------------------------

_CAPTURE: contextvars.ContextVar = contextvars.ContextVar("unveil_key_mass", default=None)
MASS_ATTENTION = "unveil_sdpa"


class KeyMassCapture:
    """Collects, per layer, the softmax mass of the last ``rows`` queries on the weighted keys."""

    def __init__(self, weights: torch.Tensor):
        # [B, L_total] key weights (1 on the keys whose mass is wanted), or [B, L_total, K]: K masses
        self.weights = weights
        self.rows, self.current, self.shared = 0, None, False
        self.passes: list[dict[int, torch.Tensor]] = []

    def start(self, rows: int, weights: torch.Tensor) -> None:
        self.rows, self.current = rows, weights
        self.passes.append({})

    def record(self, module, query, key, mask, scaling) -> None:
        b, h, lq, d = query.shape
        if self.current is None or b != self.current.shape[0] or getattr(module, "layer_idx", None) is None:
            return  # a pass this capture does not watch (e.g. a vision tower's attention)
        hk, lk, r = key.shape[1], key.shape[2], min(self.rows, lq)
        q = query[:, :, -r:].float().reshape(b, hk, (h // hk) * r, d)  # GQA: query heads grouped by kv head
        s = (q @ key.float().transpose(-1, -2)).reshape(b, h, r, lk) * (scaling or d**-0.5)
        if mask is None:  # causal without padding: query i of the last r sits at key position lk - r + i
            qpos = torch.arange(lk - r, lk, device=s.device)
            s = s.masked_fill(torch.arange(lk, device=s.device)[None, :] > qpos[:, None], float("-inf"))
        elif mask.dtype == torch.bool:
            s = s.masked_fill(~mask[:, :, -r:, :lk], float("-inf"))
        else:
            s = s + mask[:, :, -r:, :lk].float()
        w = self.current[:, :lk].to(device=s.device, dtype=torch.float32)
        p = torch.softmax(s, -1)
        # [b, h, r]: mass on the weighted keys; with K weight columns [b, h, r, K] (e.g. one per patch)
        mass = (p * w[:, None, None, :]).sum(-1) if w.dim() == 2 else p @ w[:, None]
        self.passes[-1][module.layer_idx] = mass.cpu()


def _mass_attention(module, query, key, value, attention_mask, *args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cap = _CAPTURE.get()
    if cap is not None:
        cap.record(module, query, key, attention_mask, kwargs.get("scaling"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def _register_mass_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(MASS_ATTENTION, _mass_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(MASS_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def mass_attention(model, capture: KeyMassCapture):
    """Within the block the LM's attention is sdpa plus ``capture``; the implementation is restored after."""
    _register_mass_attention()
    cfg = unwrap(model).config
    cfgs = [getattr(cfg, "text_config", None) or cfg]
    prev = [c._attn_implementation for c in cfgs]
    token = _CAPTURE.set(capture)
    try:
        for c in cfgs:
            c._attn_implementation = MASS_ATTENTION
        yield capture
    finally:
        _CAPTURE.reset(token)
        for c, p in zip(cfgs, prev):
            c._attn_implementation = p


@torch.no_grad()
def key_mass(
    model,
    inputs: dict,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    key_weights: torch.Tensor,
    group: torch.Tensor | None = None,
    n_images: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([layers, N, heads, T + 1], [N, T])``: the mass that queries ``P-1 .. P+T-1`` put on the
    keys weighted by ``key_weights`` ``[N, P + T]``, and the completion tokens' log-probs (same pass).
    ``key_weights`` ``[N, P + T, K]`` gives K masses per query, ``[layers, N, heads, T + 1, K]``
    (one-hot columns: the attention on each of K keys, e.g. an image's patches, for a localiser).

    With ``group``, the prompt columns of ``key_weights`` must agree within a group (they mark the
    prompt's keys, e.g. its image patches inside the lesion box): row ``P-1`` is computed once per prompt."""
    capture = KeyMassCapture(key_weights)
    with eval_mode(model), mass_attention(model, capture):
        hidden = completion_hidden(model, inputs, completion_ids, completion_mask, group, n_images, capture)
    _, head = body_and_head(model)
    logps, _ = token_logprobs(head, hidden[:, :-1], completion_ids, completion_mask)
    layers = sorted(capture.passes[-1])
    if capture.shared:  # row P-1 came from the prompt pass, once per prompt; then the completions' passes
        _, inv = prompt_rows(group)
        first, rest = capture.passes[0], capture.passes[1:]
        mass = torch.stack([torch.cat([first[i][inv], torch.cat([p[i] for p in rest])], dim=2) for i in layers])
    else:
        mass = torch.stack([capture.passes[0][i] for i in layers])
    return mass, logps.cpu()


# --- reference, dropout, modes -------------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        if was:
            model.train()


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout probability to 0 (``nn.Dropout`` modules and the float ``attention_dropout`` /
    ``dropout`` attributes attention layers read), so log-probs are deterministic and the ratio is 1
    before the first update, as TRL's ``disable_dropout``."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


def _is_fsdp(module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def _sharded_reference(copy):
    """The reference's module under FSDP: its top-level weights (embeddings, head: outside every
    layer unit) gathered for the whole use, each wrapped layer gathered by its own forward (every
    rank runs the same forwards: the reference scores equal-sized batches)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(copy, recurse=False, writeback=False):
        yield copy.module


class ReferencePolicy:
    """The frozen policy a KL term or a DPO log-ratio anchors to.

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
        if self.copy is not None and not _is_fsdp(self.copy):  # FSDP places its own shards
            self.copy.to(device)
        return self

    @contextlib.contextmanager
    def model(self):
        with torch.no_grad():
            if self.adapter_off:
                with self.policy.disable_adapter(), eval_mode(self.policy):
                    yield self.policy
            else:
                if _is_fsdp(self.copy):  # trainer=fsdp: the sharded copy (unveil.utils.fsdp)
                    yield from _sharded_reference(self.copy)
                    return
                p, q = next(self.policy.parameters()), next(self.copy.parameters())
                if q.device != p.device:  # follows the policy (Lightning moves the stage, not the copy)
                    self.copy.to(p.device)
                yield self.copy
