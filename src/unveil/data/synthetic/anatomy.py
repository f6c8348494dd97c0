"""Procedural backgrounds with anatomy-like structure, one function per modality.

Each returns ``(image, organ_mask)``: an HxWx3 float image in [0, 1] and a boolean mask of
where lesions may appear (lung fields, retina, ...). Randomness comes only from ``rng``.
"""

from __future__ import annotations

import numpy as np


def _grid(size: int):
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return x, y


def _ellipse(x, y, cx, cy, rx, ry, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    xr, yr = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
    return (xr / rx) ** 2 + (yr / ry) ** 2 <= 1.0


def _smooth_noise(rng, size: int, scale: int = 8) -> np.ndarray:
    """Low-frequency texture: coarse noise upsampled bilinearly (tissue-like mottling)."""
    coarse = rng.standard_normal((scale + 1, scale + 1)).astype(np.float32)
    idx = np.linspace(0, scale, size)
    i0 = np.floor(idx).astype(int).clip(0, scale - 1)
    f = (idx - i0)[:, None]
    rows = coarse[i0] * (1 - f) + coarse[i0 + 1] * f
    cols = rows[:, i0] * (1 - f.T) + rows[:, i0 + 1] * f.T
    return cols


def ct(rng: np.random.Generator, size: int):
    """Axial chest CT: body ellipse, two dark lung fields, bright spine, table."""
    x, y = _grid(size)
    img = np.zeros((size, size), np.float32)
    body = _ellipse(x, y, 0.5, 0.52, rng.uniform(0.40, 0.46), rng.uniform(0.32, 0.38))
    img[body] = 0.45
    sep = rng.uniform(0.17, 0.21)
    lungs = np.zeros_like(body)
    for side in (-1, 1):
        lungs |= _ellipse(
            x, y, 0.5 + side * sep, 0.48, rng.uniform(0.13, 0.16), rng.uniform(0.19, 0.23), side * rng.uniform(0, 0.2)
        )
    lungs &= body
    img[lungs] = 0.12
    img[_ellipse(x, y, 0.5, 0.78, 0.06, 0.05)] = 0.9  # vertebra
    img[_ellipse(x, y, 0.5, 0.5, 0.07, 0.09)] = 0.6  # mediastinum / heart
    img[(y > 0.9) & (y < 0.92)] = 0.35  # table
    img += 0.05 * _smooth_noise(rng, size, 10) * body
    return img, lungs


def xray(rng: np.random.Generator, size: int):
    """Frontal chest radiograph: bright thorax, darker lung fields, ribs, mediastinum."""
    x, y = _grid(size)
    img = 0.15 + 0.1 * y  # soft gradient
    thorax = _ellipse(x, y, 0.5, 0.55, 0.44, 0.48)
    img = np.where(thorax, 0.65, img).astype(np.float32)
    lungs = np.zeros_like(thorax)
    for side in (-1, 1):
        lungs |= _ellipse(
            x, y, 0.5 + side * rng.uniform(0.18, 0.22), 0.5, rng.uniform(0.14, 0.17), rng.uniform(0.28, 0.33)
        )
    img[lungs] = 0.3
    # ribs: bright arcs crossing the lung fields
    phase = rng.uniform(0, 1)
    ribs = (np.sin((y * 9 + 1.5 * (x - 0.5) ** 2 + phase) * 2 * np.pi) > 0.75) & lungs
    img[ribs] += 0.12
    img[(np.abs(x - 0.5) < 0.07) & thorax] = 0.8  # mediastinum / spine
    img += 0.04 * _smooth_noise(rng, size, 12)
    return img, lungs


def fundus(rng: np.random.Generator, size: int):
    """Colour fundus photograph: orange retina disc, bright optic disc, dark vessels."""
    x, y = _grid(size)
    retina = _ellipse(x, y, 0.5, 0.5, 0.46, 0.46)
    shade = 1.0 - 0.6 * ((x - 0.5) ** 2 + (y - 0.5) ** 2)
    rgb = np.zeros((size, size, 3), np.float32)
    base = np.array([0.75, 0.35, 0.15], np.float32) * rng.uniform(0.85, 1.1)
    rgb[retina] = base
    rgb *= shade[..., None]
    odx = 0.5 + rng.choice([-1, 1]) * rng.uniform(0.22, 0.28)
    disc = _ellipse(x, y, odx, 0.5, 0.07, 0.08)
    rgb[disc] = [0.95, 0.85, 0.6]
    # vessels: a few arcs leaving the optic disc
    vessels = np.zeros_like(retina)
    for k in range(4):
        a = rng.uniform(-0.5, 0.5) + (0 if k < 2 else np.pi)
        curve = 0.5 + (x - odx) * np.tan(a * 0.4) + (0.25 if k % 2 else -0.25) * (x - odx) ** 2 * 4
        vessels |= (np.abs(y - curve) < 0.008) & retina
    rgb[vessels] *= 0.55
    rgb += 0.03 * _smooth_noise(rng, size, 10)[..., None] * retina[..., None]
    lesion_zone = _ellipse(x, y, 0.5, 0.5, 0.38, 0.38) & ~_ellipse(x, y, odx, 0.5, 0.12, 0.13)
    return rgb, lesion_zone


MODALITIES = {"ct": ct, "xray": xray, "fundus": fundus}
MODALITY_NAMES = {"ct": "CT", "xray": "chest X-ray", "fundus": "fundus"}
