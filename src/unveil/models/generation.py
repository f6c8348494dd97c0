"""Batched generation shared by evaluation and RL rollouts.

G samples per prompt come from one ``generate`` call with KV cache
(``num_return_sequences``); image placeholder tokens are suppressed so a policy can never
emit them.

Greedy decoding can read box coordinates as the *median* of the model's distribution over the
grid values instead of its mode (``coord_decoding="median"``), for tokenizers where every grid
value is one token (the tiny model's whole-number tokens). A coordinate is a regression target
read out of a classifier: the mode of a broad, ragged distribution is a noisier estimate than its
median (the mean falls between modes when the distribution has two).
"""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StaticCache,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from unveil.models.inputs import PER_TOKEN, model_inputs
from unveil.models.policy import position_ids_from_mask, unwrap

# Special tokens that are answer text, not markup: Qwen2-VL's boxes and object references.
KEEP_SPECIAL = (
    "<|box_start|>",
    "<|box_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
)


def decode(tok, ids) -> list[str]:
    """batch_decode without special tokens, except those of KEEP_SPECIAL (box formats parse them)."""
    keep = {tok.convert_tokens_to_ids(t) for t in KEEP_SPECIAL if t in tok.all_special_tokens}
    if not keep:
        return tok.batch_decode(ids, skip_special_tokens=True)
    drop = set(tok.all_special_ids) - keep
    rows = ids.tolist() if torch.is_tensor(ids) else ids
    return tok.batch_decode([[i for i in row if i not in drop] for row in rows], skip_special_tokens=False)


COORD_DECODING = ("argmax", "median")


def grid_token_ids(tok, scale: int) -> list[int]:
    """Token id of each grid value 0..scale, or a ValueError when a value is not one token."""
    ids = []
    for v in range(scale + 1):
        enc = tok.encode(str(v), add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(
                f"coord_decoding=median needs every box-grid value as one token; this tokenizer "
                f"splits '{v}' into {len(enc)} tokens. Use coord_decoding=argmax with this backbone."
            )
        ids.append(enc[0])
    return ids


class MedianCoordinate(LogitsProcessor):
    """Where the greedy choice is a grid value, choose the median grid value instead (the
    distribution renormalised over the grid tokens). Other positions are left alone."""

    def __init__(self, grid_ids: list[int]):
        self.ids = torch.tensor(grid_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ids = self.ids.to(scores.device)
        rows = torch.isin(scores.argmax(-1), ids).nonzero().squeeze(1)
        if rows.numel() == 0:
            return scores
        cdf = scores[rows][:, ids].float().softmax(-1).cumsum(-1)
        median = (cdf < 0.5).sum(-1).clamp(max=len(ids) - 1)  # first value whose CDF reaches 1/2
        out = scores.clone()
        out[rows] = torch.finfo(scores.dtype).min
        out[rows, ids[median]] = 0.0
        return out


def coord_processor(backbone, coord_decoding: str):
    if coord_decoding not in COORD_DECODING:
        raise ValueError(f"coord_decoding={coord_decoding!r}; expected one of {COORD_DECODING}")
    if coord_decoding == "argmax":
        return None
    scale = getattr(backbone.box_format, "scale", None)
    if scale is None:
        raise ValueError(
            f"coord_decoding=median needs an integer-grid box format; {backbone.box_format.name} is not one"
        )
    key = ("grid_token_ids", scale)  # one tokenizer pass per backbone, not per batch
    if key not in backbone.cache:
        backbone.cache[key] = grid_token_ids(backbone.tokenizer, scale)
    return MedianCoordinate(backbone.cache[key])


def _autocast_on(device: torch.device) -> bool:
    return torch.is_autocast_enabled(device.type)


@torch.no_grad()
def prefill_once(model, inputs: dict, g: int, max_new_tokens: int) -> dict:
    """The prompts' KV cache, computed once per prompt (vision tower included) and repeated ``g``
    times per prompt, with the inputs ``generate`` then takes: each prompt's ids repeated ``g``
    times, and the cache covering all but their last token (which ``generate`` feeds itself). No
    image input is passed on: the images are in the cache. Sampled and greedy outputs equal
    generate()'s own repetition of the prompts (tests/test_policy.py).

    The cache is transformers' ``StaticCache``, sized for prompt + ``max_new_tokens``: each decoding
    step writes its token in place, where a ``DynamicCache`` copies the whole (G-fold) cache. Under
    autocast (``bf16-mixed``) the prompt's keys and the decoded ones can differ in dtype, so the
    repeated ``DynamicCache`` is kept there."""
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    for k in PER_TOKEN:
        if extra.get(k) is not None:
            extra[k] = extra[k][:, :-1]
    if extra.get("image_grid_thw") is None:  # left padding; M-RoPE models compute their own positions
        extra["position_ids"] = position_ids_from_mask(am)[:, :-1]
    out = model(input_ids=ids[:, :-1], attention_mask=am[:, :-1], use_cache=True, logits_to_keep=1, **extra)
    cache = out.past_key_values
    if _autocast_on(ids.device):  # the dtype decoding writes is not known ahead: a DynamicCache adapts
        cache.batch_repeat_interleave(g)
    else:
        cache = StaticCache(config=unwrap(model).config, max_cache_len=ids.shape[1] + max_new_tokens)
        for layer, filled in zip(cache.layers, out.past_key_values.layers):
            layer.update(filled.keys.repeat_interleave(g, dim=0), filled.values.repeat_interleave(g, dim=0))
    trunk = getattr(unwrap(model), "model", None)
    if getattr(trunk, "rope_deltas", None) is not None:  # M-RoPE: decoding continues from each prompt's offset
        trunk.rope_deltas = trunk.rope_deltas.repeat_interleave(g, dim=0)
    return {
        "input_ids": ids.repeat_interleave(g, dim=0),
        "attention_mask": am.repeat_interleave(g, dim=0),
        "past_key_values": cache,
    }


def sampling_processors(suppress, temperature: float, top_k: int, top_p: float, device) -> LogitsProcessorList:
    """generate()'s processors for sampling, in its order: suppressed tokens, then temperature,
    top-k and top-p (each only where it changes something, as generate() adds them)."""
    procs = LogitsProcessorList()
    if suppress:
        procs.append(SuppressTokensLogitsProcessor(list(suppress), device=device))
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p=top_p))
    return procs


def decode_step(model):
    """``(ids, mask, positions, cache) -> last-position logits`` of one decoding step. A step after
    the prompt has no image input, so it runs the language model and its head alone (the
    multimodal wrapper around them only looks for image tokens there); the whole model where that
    shortcut is not known to be the same computation (a head with logit soft-capping, no decoder)."""
    hf = unwrap(model)
    dec, head = hf.get_decoder(), hf.get_output_embeddings()
    text = hf.config.get_text_config()
    if dec is None or head is None or getattr(text, "final_logit_softcapping", None) or dec is hf:

        def whole(ids, am, pos, cache):
            out = model(input_ids=ids, attention_mask=am, position_ids=pos, past_key_values=cache, use_cache=True)
            return out.logits[:, -1]

        return whole

    def lm(ids, am, pos, cache):
        h = dec(input_ids=ids, attention_mask=am, position_ids=pos, past_key_values=cache, use_cache=True)
        return head(h.last_hidden_state[:, -1])

    return lm


@torch.no_grad()
def sample_loop(model, inputs: dict, max_new_tokens: int, processors, eos_id: int, pad_id: int) -> torch.Tensor:
    """generate()'s sampling loop (``_sample``) over a prefilled cache (:func:`prefill_once`), without
    its per-step machinery: positions come from the model's own rule once (M-RoPE included) and then
    advance by one, the 2D mask grows by one column, the cache is written in place. Sampled tokens
    equal generate()'s under the same seed (tests/test_policy.py); returns prompt + completion ids.

    Why: on a small model generate()'s per-step Python (input preparation, a 4D mask built per step
    for the static cache, stopping criteria) costs about as much as the forward itself."""
    ids, am, cache = inputs["input_ids"], inputs["attention_mask"], inputs["past_key_values"]
    hf = unwrap(model)
    pos = hf._prepare_position_ids_for_generation(
        ids, {"input_ids": ids, "attention_mask": am, "past_key_values": cache}
    )
    pos = pos[..., -1:]
    step_ids, done = ids[:, -1:], torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    seq, out = ids, []
    step = decode_step(model)
    for _ in range(max_new_tokens):
        logits = step(step_ids, am, pos, cache).to(torch.float32)
        scores = processors(seq, logits)
        nxt = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out.append(nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        done = done | (nxt == eos_id)
        if bool(done.all()):
            break
        step_ids, pos = nxt[:, None], pos + 1
        am = torch.cat([am, am.new_ones(am.shape[0], 1)], dim=1)
    return seq


@torch.no_grad()
def generate(
    backbone,
    batch: dict,
    max_new_tokens: int = 48,
    do_sample: bool = False,
    num_return_sequences: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    coord_decoding: str = "argmax",
    share_prompt: bool = True,
) -> dict:
    """Returns prompt+completion ids, the completion ids/mask and decoded completion texts.
    ``coord_decoding`` applies to greedy decoding only; sampling always samples. With
    ``num_return_sequences`` G > 1 and ``share_prompt``, the prompts are prefilled once and their
    KV cache repeated G times (:func:`prefill_once`) instead of generate() running each prompt G times."""
    model = backbone.model
    tok = backbone.tokenizer
    inputs = model_inputs(batch)
    # Every setting that changes which token comes next is given, so that the values a checkpoint's
    # generation_config.json carries (Qwen2-VL: top_k=1, top_p=0.001, repetition_penalty=1.05) never
    # apply: RL samples from exactly the distribution its log-probs are computed under.
    kw = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_return_sequences=num_return_sequences,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        use_cache=True,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        temperature=temperature if do_sample else 1.0,
        top_p=top_p if do_sample else 1.0,
        top_k=top_k if do_sample else 0,
        min_p=None,
    )
    bad = backbone.image_token_ids
    if bad:
        kw["suppress_tokens"] = bad
    proc = None if do_sample else coord_processor(backbone, coord_decoding)
    if proc is not None:
        kw["logits_processor"] = LogitsProcessorList([proc])
    was_training = model.training
    model.eval()
    if num_return_sequences > 1 and share_prompt:
        inputs = prefill_once(model, inputs, num_return_sequences, max_new_tokens)
        kw["num_return_sequences"] = 1  # the rows are already repeated (greedy decoding may take G > 1 too)
    if do_sample and "past_key_values" in inputs:  # RL rollouts: the lean loop over the shared prompt's cache
        warp = sampling_processors(bad, temperature, top_k, top_p, inputs["input_ids"].device)
        out = sample_loop(model, inputs, max_new_tokens, warp, tok.eos_token_id, tok.pad_token_id)
    else:
        out = model.generate(**inputs, **kw)
    if was_training:
        model.train()
    plen = inputs["input_ids"].shape[1]
    completion = out[:, plen:]
    # Everything after the first EOS is padding: mask it.
    is_eos = completion == tok.eos_token_id
    after = (is_eos.cumsum(1) - is_eos.long()) > 0
    mask = (~after & (completion != tok.pad_token_id) | is_eos & ~after).long()
    texts = decode(tok, completion.masked_fill(mask == 0, tok.pad_token_id))
    return {
        "sequences": out,
        "completion_ids": completion,
        "completion_mask": mask,
        "texts": texts,
        "prompt_length": plen,
    }
