"""Lesions of several types drawn into a background; each returns its exact pixel mask."""

from __future__ import annotations

import numpy as np

# Radius ranges as fractions of the image side: types differ in size as well as look.
FINDINGS = {
    "nodule": (0.045, 0.075),  # small bright round
    "mass": (0.09, 0.14),  # large bright lobulated
    "cyst": (0.06, 0.09),  # dark centre, bright rim
}


def draw(rng: np.random.Generator, img: np.ndarray, kind: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Draw a lesion in place; return its boolean mask."""
    size = img.shape[0]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    colour = img.ndim == 3
    if kind == "nodule":
        mask = d <= r
        prof = np.clip(1 - (d / r) ** 2, 0, 1)
        delta = 0.55 * prof
    elif kind == "mass":
        # lobulated: union of a few offset discs
        mask = d <= r * 0.7
        for _ in range(4):
            a = rng.uniform(0, 2 * np.pi)
            ox, oy = cx + np.cos(a) * r * 0.45, cy + np.sin(a) * r * 0.45
            mask |= np.sqrt((x - ox) ** 2 + (y - oy) ** 2) <= r * rng.uniform(0.45, 0.6)
        delta = 0.45 * mask
    elif kind == "cyst":
        mask = d <= r
        rim = (d > r * 0.75) & mask
        delta = np.where(rim, 0.45, np.where(mask, -0.35, 0.0))
    else:
        raise ValueError(f"unknown finding {kind!r}")
    delta = delta * mask
    if colour:
        tint = np.array([1.0, 0.95, 0.45], np.float32)  # exudate-like yellow on the retina
        img += delta[..., None] * tint
    else:
        img += delta
    np.clip(img, 0, 1, out=img)
    return mask


def mask_box(mask: np.ndarray) -> list[float]:
    """Tight normalised xyxy box around a mask (pixel edges, so a 1-px mask has area > 0)."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return [xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h]
