"""Visual dispreferred samples (MMedPO): the ground-truth answer paired with a noised image.

The pair keeps the ground-truth text on both sides (``rejected.answer`` = the same text);
only the image differs: ``rejected.images`` is a copy whose lesion region is destroyed, so
the preference teaches the model to ground its answer in the lesion rather than in priors.

Lesion mask (``mode=local``), per image:
1. a map: 1 inside the image's ground-truth boxes (or a heat map when the record names one
   in ``heatmap``: a path, or one path per image, to a ``.npy`` array or a grayscale image);
2. Gaussian blur with sigma = ``blur_sigma`` x the image side;
3. threshold at mean - std of the blurred map over its support (pixels where it exceeds
   ``support_eps`` x its maximum, default 5%: over the whole image a small box gives a
   negative threshold and selects everything, and with a tiny eps the threshold falls on the
   support's edge for small boxes). The result is the box, rounded at the corners and grown
   by one to two sigma (a 12-px box at sigma 2.6 px: 3 px). A dense heat map's support is
   nearly the whole image, so for it this is the plain mean - std.
``mode=global`` noises the whole image (the ablation).

Noise (image scaled to [-1, 1], eps ~ N(0, 1), only inside the mask):
- ``noise=diffusion``: the DDPM forward step ``x* = sqrt(a_k) x + sqrt(1 - a_k) eps`` with
  ``a_k = prod_{i<=k} (1 - beta_i)``, betas linear from ``beta_start`` to ``beta_end``
  over ``num_steps`` (k = ``step``);
- ``noise=replace``: ``x* = eps`` (clipped).
Deterministic per (seed, image, mask); records that share an image and its boxes (several
questions about one study) share one noised copy, written to ``noised/`` in the output
directory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from unveil.curate.common import BaseBuilder, Context, Outcome, rng_for, stable_int, with_rejected
from unveil.data.images import load_image
from unveil.data.schema import Sample

log = logging.getLogger(__name__)


def alpha_bar(step: int, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> float:
    """Cumulative signal fraction a_k of a linear beta schedule after ``step`` forward steps."""
    if not 1 <= step <= num_steps:
        raise ValueError(f"noise step must be in [1, {num_steps}], got {step}")
    betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    return float(np.prod(1.0 - betas[:step]))


def box_map(shape: tuple[int, int], boxes) -> np.ndarray:
    """1 inside the (normalised xyxy) boxes, 0 elsewhere; every box covers at least one pixel."""
    h, w = shape
    m = np.zeros((h, w), np.float32)
    for b in boxes:
        x1, x2 = int(np.floor(b[0] * w)), int(np.ceil(b[2] * w))
        y1, y2 = int(np.floor(b[1] * h)), int(np.ceil(b[3] * h))
        m[max(y1, 0) : max(min(y2, h), y1 + 1), max(x1, 0) : max(min(x2, w), x1 + 1)] = 1.0
    return m


def load_heatmap(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """A heat map as floats in [0, 1] at the image's (h, w)."""
    path = Path(path)
    arr = (
        np.load(path).astype(np.float32)
        if path.suffix == ".npy"
        else np.asarray(Image.open(path).convert("F"), np.float32)
    )
    arr = np.nan_to_num(np.squeeze(arr))
    if arr.shape != shape:
        arr = np.asarray(Image.fromarray(arr).resize((shape[1], shape[0]), Image.BILINEAR), np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros(shape, np.float32)


def lesion_mask(
    shape: tuple[int, int],
    boxes=(),
    heatmap: np.ndarray | None = None,
    blur_sigma: float = 0.02,
    support_eps: float = 0.05,
) -> np.ndarray:
    """Boolean lesion mask: box (or heat) map -> Gaussian blur -> threshold at mean - std."""
    from scipy.ndimage import gaussian_filter

    m0 = heatmap.astype(np.float32) if heatmap is not None else box_map(shape, boxes)
    if m0.max() <= 0:
        return np.zeros(shape, bool)
    sigma = float(blur_sigma) * max(shape)
    m1 = gaussian_filter(m0, sigma=sigma) if sigma > 0 else m0
    support = m1 > support_eps * m1.max()
    vals = m1[support]
    thr = vals.mean() - vals.std()
    return support & (m1 >= thr)


def noise_image(
    img: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    noise: str = "diffusion",
    step: int = 500,
    num_steps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> np.ndarray:
    """Noise a uint8 image (HxW or HxWxC) inside a boolean HxW mask; pixels outside stay bit-identical."""
    x = img.astype(np.float32) / 127.5 - 1.0
    eps = rng.standard_normal(img.shape[:2]).astype(np.float32)  # one field for all channels of a grey image
    if img.ndim == 3:
        eps = eps[..., None] if _grey(img) else rng.standard_normal(img.shape).astype(np.float32)
    if noise == "diffusion":
        a = alpha_bar(step, num_steps, beta_start, beta_end)
        xn = np.sqrt(a) * x + np.sqrt(1.0 - a) * eps
    elif noise == "replace":
        xn = np.broadcast_to(eps, x.shape)
    else:
        raise ValueError(f"noise must be 'diffusion' or 'replace', got {noise!r}")
    out_vals = np.clip(np.round((np.clip(xn, -1, 1) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    out = img.copy()
    out[mask] = out_vals[mask]
    return out


def _grey(img: np.ndarray) -> bool:
    return img.ndim == 2 or (
        img.shape[2] >= 3 and np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])
    )


def read_image(path: str | Path) -> np.ndarray:
    """uint8 array, HxW for grey images, HxWx3 otherwise."""
    arr = np.asarray(load_image(path), np.uint8)
    return arr[..., 0].copy() if _grey(arr) else arr.copy()


class LesionNoiseBuilder(BaseBuilder):
    name = "lesion_noise"

    def __init__(
        self,
        mode: str = "local",
        noise: str = "diffusion",
        step: int = 500,
        num_steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        blur_sigma: float = 0.02,
        support_eps: float = 0.05,
        heatmap_field: str = "heatmap",
        image_dir: str = "noised",
        id_suffix: str = "-vis",
    ):
        super().__init__()
        if mode not in ("local", "global"):
            raise ValueError(f"builder.mode must be 'local' or 'global', got {mode!r}")
        if noise not in ("diffusion", "replace"):
            raise ValueError(f"builder.noise must be 'diffusion' or 'replace', got {noise!r}")
        alpha_bar(step, num_steps, beta_start, beta_end)  # validates the step
        self.mode, self.noise, self.step, self.num_steps = mode, noise, int(step), int(num_steps)
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        self.blur_sigma, self.support_eps = float(blur_sigma), float(support_eps)
        self.heatmap_field, self.image_dir, self.id_suffix = heatmap_field, image_dir, id_suffix
        self._written: set[str] = set()

    def _heatmaps(self, s: Sample, ctx: Context) -> list[str | None]:
        hm = s.meta.get(self.heatmap_field)
        if hm is None:
            return [None] * len(s.images)
        hms = hm if isinstance(hm, list) else [hm] + [None] * (len(s.images) - 1)
        root = ctx.input_root or Path(".")
        return [str((root / h).resolve()) if isinstance(h, str) else None for h in hms]

    def masks(self, s: Sample, ctx: Context, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
        if self.mode == "global":
            return [np.ones(sh, bool) for sh in shapes]
        out = []
        for k, (sh, hm) in enumerate(zip(shapes, self._heatmaps(s, ctx))):
            boxes = [b for b, i in zip(s.boxes, s.box_images) if i == k]
            heat = load_heatmap(hm, sh) if hm else None
            out.append(lesion_mask(sh, boxes, heat, self.blur_sigma, self.support_eps))
        return out

    def run(self, samples: list[Sample], ctx: Context) -> Iterator[Outcome]:
        for s in samples:
            ctx.advance(1)
            if not s.images:
                yield Outcome(skipped="no_image")
                continue
            imgs = [read_image(p) for p in s.images]
            masks = self.masks(s, ctx, [im.shape[:2] for im in imgs])
            if not any(m.any() for m in masks):
                yield Outcome(skipped="no_lesion_region")  # a normal study has nothing to noise locally
                continue
            rejected, fractions = [], []
            for path, img, mask in zip(s.images, imgs, masks):
                if not mask.any():
                    rejected.append(path)  # an image without a lesion stays as it is
                    continue
                # Records of the same study (several questions, one image) share one noised copy:
                # the noise depends on the seed, the image and its mask, not on the record.
                rel = ctx.images.rel(path)
                key = stable_int(rel, np.packbits(mask).tobytes().hex(), self.noise, self.step)
                dst = ctx.images.new(f"{self.image_dir}/{_safe(Path(rel).with_suffix('').as_posix())}_{key:08x}.png")
                if str(dst) not in self._written:
                    rng = rng_for(ctx.seed, "lesion_noise", rel, key)
                    noised = noise_image(
                        img, mask, rng, self.noise, self.step, self.num_steps, self.beta_start, self.beta_end
                    )
                    Image.fromarray(noised).save(dst)
                    self._written.add(str(dst))
                rejected.append(str(dst))
                fractions.append(float(mask.mean()))
            self.stats[f"mode/{self.mode}"] += 1
            yield Outcome(
                with_rejected(
                    s,
                    images=rejected,
                    suffix=self.id_suffix,
                    curate_builder=self.name,
                    curate_noise={"mode": self.mode, "noise": self.noise, "step": self.step},
                    curate_mask_fraction=float(np.mean(fractions)),
                )
            )


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120]
