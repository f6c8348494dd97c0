"""Visual dispreferred samples (MMedPO): the ground-truth answer paired with a noised image.

The pair keeps the ground-truth text on both sides (``rejected.answer`` = the same text);
only the image differs: ``rejected.images`` is a copy whose lesion region is destroyed, so
the preference teaches the model to ground its answer in the lesion rather than in priors.

Lesion region (``mode=local``), per image, from a localiser (:mod:`unveil.curate.localisers`,
``localiser``): by default (``auto``) the record's ground-truth boxes when it has them, else the
heat map file it names (``heatmap``), else the policy VLM's own attention from its answer tokens
to the image patches, so box-free VQA records (VQA-RAD, SLAKE, IU-Xray) get visual pairs too. A
heat map is cut as MMedPO's released code does (15 x 15 Gaussian blur, ``> mean - std`` over the
whole image); a box map by blurring it (``blur_sigma`` x the side) and thresholding at mean - std
over the blurred box's support (``support_eps``), which gives the box, rounded and grown by one to
two sigma. A ``localize`` record without boxes is a normal study by its own label: skipped.
The localiser's confidence (see localisers) is written as ``curate_localiser_confidence``; the
relevance-weight builder uses it as the visual pair's weight.
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
from unveil.curate.localisers import (
    Localisation,
    box_map,
    heat_confidence,
    make_localiser,
    official_region,
    support_region,
)
from unveil.data.images import load_image
from unveil.data.schema import Sample

log = logging.getLogger(__name__)


def alpha_bar(step: int, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> float:
    """Cumulative signal fraction a_k of a linear beta schedule after ``step`` forward steps."""
    if not 1 <= step <= num_steps:
        raise ValueError(f"noise step must be in [1, {num_steps}], got {step}")
    betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    return float(np.prod(1.0 - betas[:step]))


def lesion_mask(
    shape: tuple[int, int],
    boxes=(),
    heatmap: np.ndarray | None = None,
    blur_sigma: float = 0.02,
    support_eps: float = 0.05,
) -> np.ndarray:
    """Boolean lesion mask of boxes (the support rule) or of a heat map (MMedPO's official cut)."""
    if heatmap is not None:
        return official_region(heatmap) if heatmap.max() > heatmap.min() else np.zeros(shape, bool)
    return support_region(box_map(shape, boxes), blur_sigma, support_eps)


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
        localiser=None,
        heat_k_std: float = -1.0,
        batch_size: int = 8,
        image_dir: str = "noised",
        id_suffix: str = "-vis",
    ):
        """``localiser``: a localiser of :mod:`unveil.curate.localisers` (a ``_target_`` config or an
        object; default :class:`~unveil.curate.localisers.AutoLocaliser`). ``heat_k_std``: a heat map's
        region is ``blur > mean + heat_k_std * std``
        (-1: MMedPO's code). ``batch_size``: records localised at once (one model pass for attention)."""
        super().__init__()
        if mode not in ("local", "global"):
            raise ValueError(f"builder.mode must be 'local' or 'global', got {mode!r}")
        if noise not in ("diffusion", "replace"):
            raise ValueError(f"builder.noise must be 'diffusion' or 'replace', got {noise!r}")
        alpha_bar(step, num_steps, beta_start, beta_end)  # validates the step
        self.mode, self.noise, self.step, self.num_steps = mode, noise, int(step), int(num_steps)
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        self.blur_sigma, self.support_eps, self.heat_k_std = float(blur_sigma), float(support_eps), float(heat_k_std)
        self.localiser = make_localiser(localiser)
        self.batch_size, self.image_dir, self.id_suffix = max(1, int(batch_size)), image_dir, id_suffix
        self._written: set[str] = set()

    def region(self, loc: Localisation | None, shape: tuple[int, int]) -> tuple[np.ndarray, float]:
        """(boolean region, the localiser's confidence) of one image."""
        if loc is None:
            return np.zeros(shape, bool), float("nan")
        if loc.rule == "support":
            return support_region(loc.heat, self.blur_sigma, self.support_eps), loc.confidence
        flat = loc.heat.max() <= loc.heat.min()
        region = np.zeros(shape, bool) if flat else official_region(loc.heat, self.heat_k_std)
        conf = loc.confidence if np.isfinite(loc.confidence) else heat_confidence(loc.heat, region)
        return region, conf

    def masks(self, samples: list[Sample], ctx: Context, shapes) -> list[tuple[list[np.ndarray], float]]:
        """Per sample: one region per image and the localiser's confidence (mean over its images)."""
        if self.mode == "global":
            return [([np.ones(sh, bool) for sh in shs], float("nan")) for shs in shapes]
        normal = [s.task == "localize" and not s.boxes for s in samples]  # a normal study by its own label
        todo = [i for i, n in enumerate(normal) if not n]
        locs = self.localiser([samples[i] for i in todo], [shapes[i] for i in todo], ctx) if todo else []
        out = [([np.zeros(sh, bool) for sh in shs], float("nan")) for shs in shapes]
        for i, per in zip(todo, locs):
            got = [self.region(loc, sh) for loc, sh in zip(per, shapes[i])]
            confs = [c for m, c in got if m.any() and np.isfinite(c)]
            out[i] = ([m for m, _ in got], float(np.mean(confs)) if confs else float("nan"))
        return out

    def run(self, samples: list[Sample], ctx: Context) -> Iterator[Outcome]:
        for lo in range(0, len(samples), self.batch_size):
            chunk = samples[lo : lo + self.batch_size]
            ctx.advance(len(chunk))
            with_images = [s for s in chunk if s.images]
            yield from (Outcome(skipped="no_image") for s in chunk if not s.images)
            imgs = [[read_image(p) for p in s.images] for s in with_images]
            regions = self.masks(with_images, ctx, [[im.shape[:2] for im in ims] for ims in imgs])
            for s, ims, (masks, conf) in zip(with_images, imgs, regions):
                yield self._pair(s, ims, masks, conf, ctx)

    def _pair(self, s: Sample, imgs, masks, conf: float, ctx: Context) -> Outcome:
        if not any(m.any() for m in masks):
            return Outcome(skipped="no_lesion_region")  # a normal study has nothing to noise locally
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
        kind = "global" if self.mode == "global" else _kind(self.localiser, s)
        self.stats[f"localiser/{kind}"] += 1
        return Outcome(
            with_rejected(
                s,
                images=rejected,
                suffix=self.id_suffix,
                curate_builder=self.name,
                curate_noise={"mode": self.mode, "noise": self.noise, "step": self.step},
                curate_mask_fraction=float(np.mean(fractions)),
                curate_localiser=kind,
                curate_localiser_confidence=conf if np.isfinite(conf) else None,
            )
        )


def _kind(localiser, s: Sample) -> str:
    if localiser.name != "auto":
        return localiser.name
    return "boxes" if s.boxes else "heatmap" if s.meta.get(localiser.heatmap.field) is not None else "attention"


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120]
