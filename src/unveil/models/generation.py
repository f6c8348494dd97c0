"""Batched generation shared by evaluation and RL rollouts.

G samples per prompt come from one ``generate`` call with KV cache
(``num_return_sequences``); image placeholder tokens are suppressed so a policy can never
emit them.
"""

from __future__ import annotations

import torch

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "image_grid_thw",
                    "pixel_attention_mask", "image_attention_mask", "mm_token_type_ids")


# Special tokens that are answer text, not markup: Qwen2-VL's boxes and object references.
KEEP_SPECIAL = ("<|box_start|>", "<|box_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|quad_start|>", "<|quad_end|>")


def decode(tok, ids) -> list[str]:
    """batch_decode without special tokens, except those of KEEP_SPECIAL (box formats parse them)."""
    keep = {tok.convert_tokens_to_ids(t) for t in KEEP_SPECIAL if t in tok.all_special_tokens}
    if not keep:
        return tok.batch_decode(ids, skip_special_tokens=True)
    drop = set(tok.all_special_ids) - keep
    rows = ids.tolist() if torch.is_tensor(ids) else ids
    return tok.batch_decode([[i for i in row if i not in drop] for row in rows], skip_special_tokens=False)


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS and v is not None}


@torch.no_grad()
def generate(backbone, batch: dict, max_new_tokens: int = 48, do_sample: bool = False, num_return_sequences: int = 1,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> dict:
    """Returns prompt+completion ids, the completion ids/mask and decoded completion texts."""
    model = backbone.model
    tok = backbone.tokenizer
    inputs = model_inputs(batch)
    kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, num_return_sequences=num_return_sequences,
              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True)
    if do_sample:
        kw.update(temperature=temperature, top_p=top_p, top_k=top_k or None)
    bad = backbone.image_token_ids
    if bad:
        kw["suppress_tokens"] = bad
    was_training = model.training
    model.eval()
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
    return {"sequences": out, "completion_ids": completion, "completion_mask": mask, "texts": texts, "prompt_length": plen}
