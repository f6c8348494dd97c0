"""Model inputs as processors make them: which keys a forward takes, and rows of them.

Per-sample tensors (``input_ids``, ``attention_mask``, per-token type ids) have one row per
sample. Per-image tensors have one entry per image (``image_sizes``, ``image_grid_thw``), per image
patch row (Qwen2-VL's flattened ``pixel_values``: ``t * h * w`` rows per image) or one per sample
(Idefics3's ``[B, n_images, C, H, W]``). :func:`select_inputs` picks sample rows (repeats allowed)
and gathers each one's images, whatever the layout.
"""

from __future__ import annotations

import torch

MODEL_INPUT_KEYS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_sizes",
    "image_grid_thw",
    "pixel_attention_mask",
    "image_attention_mask",
    "mm_token_type_ids",
)
# Tensors with one entry per image (or per image patch row, for Qwen2-VL style inputs).
PER_IMAGE = ("pixel_values", "image_sizes", "image_grid_thw")
# Tensors with one entry per prompt token besides input_ids / attention_mask.
PER_TOKEN = ("mm_token_type_ids", "token_type_ids")


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS and v is not None}


def image_rows(inputs: dict, n_images: list[int]) -> dict[str, list[int]]:
    """For each per-image tensor, how many of its rows belong to each sample (absent = per sample)."""
    out = {}
    total = sum(n_images)
    for key in PER_IMAGE:
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
    per_image = image_rows(inputs, n_images)
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
