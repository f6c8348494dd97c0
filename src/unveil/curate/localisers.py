"""Where is the lesion? The localisers that MMedPO's visual pairs noise (curate/lesion_noise.py).

A localiser turns a Sample into one :class:`Localisation` per image: a heat map over the
original image's pixels, the rule that cuts it into a region, and optionally its own confidence.

- :class:`BoxLocaliser`: 1 inside the record's ground-truth boxes (what unveil did before; a
  record without boxes gets nothing);
- :class:`HeatmapLocaliser`: a heat map file the record names (``.npy`` or a grey image per
  image), e.g. one exported from MedKLIP as in the released MMedPO pipeline, with its disease
  probability when the record carries one (``score_field``);
- :class:`AttentionLocaliser`, the box-free default: the policy VLM's own attention from its
  answer tokens to the image patches, averaged over layers, heads and answer tokens,
  ``heat_j = mean_{l, h, i in answer} softmax_k(q_i . k_k / sqrt(d))_j`` for each patch j, read
  through :func:`unveil.models.policy.key_mass` (one column per patch, no attention maps kept)
  and resampled bilinearly from the patch grid, through the image's frame (padding, resizing:
  :mod:`unveil.data.frames`), onto the original pixels;
- :class:`AutoLocaliser`: boxes when the record has them, else its heat map file, else attention.

Heat maps are cut as MMedPO's released code does (``official``): a 15 x 15 Gaussian blur
(OpenCV's ``GaussianBlur(m, (15, 15), 0)``: sigma 2.6 px, reflect-101 borders) and the region
``blur > mean - std`` over the whole image. Box maps keep the ``support`` rule (blur by a fraction
of the side, mean - std over the blurred box's support): over the whole image a box covering
less than half of it has ``mean - std < 0`` and would select every pixel.

Confidence (the visual pair's weight, standing in for MMedPO's disease probability): the record's
score when a heat map file comes with one, else how much more of the heat the region holds than
its area would at uniform heat, ``clip((m - a) / (1 - a), 0, 1)`` with ``m = sum(heat * region) /
sum(heat)`` and ``a`` the region's share of the image (0 for uniform heat or a whole-image
region). Ground-truth boxes carry no confidence (NaN): the weight builder's scorer decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unveil.data.schema import Sample

RULES = ("official", "support")


@dataclass
class Localisation:
    heat: np.ndarray  # (h, w) float >= 0 over the original image's pixels
    rule: str = "official"  # how the heat becomes a region (RULES)
    confidence: float = math.nan  # the localiser's own, in [0, 1]; NaN: none


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
    """A heat map as floats in [0, 1] at the image's (h, w) (bilinear, as MMedPO resizes it)."""
    from PIL import Image

    path = Path(path)
    arr = (
        np.load(path).astype(np.float32)
        if path.suffix == ".npy"
        else np.asarray(Image.open(path).convert("F"), np.float32)
    )
    arr = np.nan_to_num(np.squeeze(arr))
    if arr.ndim != 2:
        raise ValueError(f"{path}: a heat map is a 2-D array, got shape {arr.shape}")
    if arr.shape != shape:
        arr = np.asarray(Image.fromarray(arr).resize((shape[1], shape[0]), Image.BILINEAR), np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros(shape, np.float32)


def official_region(heat: np.ndarray, k_std: float = -1.0) -> np.ndarray:
    """MMedPO's released cut: ``GaussianBlur(heat, (15, 15), 0) > mean + k_std * std`` over the whole
    image, ``k_std = -1`` (its code keeps ``mean + std``, ``k_std = 1``, as a commented-out alternative)."""
    from scipy.ndimage import gaussian_filter

    m = gaussian_filter(heat.astype(np.float32), sigma=2.6, truncate=7 / 2.6, mode="mirror")
    return m > m.mean() + float(k_std) * m.std()


def support_region(heat: np.ndarray, blur_sigma: float = 0.02, support_eps: float = 0.05) -> np.ndarray:
    """Box maps: blur by ``blur_sigma`` x the image side, then ``>= mean - std`` over the blurred map's
    support (pixels above ``support_eps`` x its maximum): the box, rounded and grown by 1-2 sigma."""
    from scipy.ndimage import gaussian_filter

    if heat.max() <= 0:
        return np.zeros(heat.shape, bool)
    sigma = float(blur_sigma) * max(heat.shape)
    m = gaussian_filter(heat.astype(np.float32), sigma=sigma) if sigma > 0 else heat.astype(np.float32)
    support = m > support_eps * m.max()
    vals = m[support]
    return support & (m >= vals.mean() - vals.std())


def heat_confidence(heat: np.ndarray, region: np.ndarray) -> float:
    """``clip((m - a) / (1 - a), 0, 1)``: the region's share of the heat above its share of the area."""
    total, a = float(heat.sum()), float(region.mean())
    if total <= 0 or a >= 1.0 or not region.any():
        return 0.0
    m = float(heat[region].sum()) / total
    return min(max((m - a) / (1.0 - a), 0.0), 1.0)


class BoxLocaliser:
    name = "boxes"

    def __call__(self, samples: list[Sample], shapes, ctx) -> list[list[Localisation | None]]:
        out = []
        for s, sh in zip(samples, shapes):
            per = []
            for k, shape in enumerate(sh):
                boxes = [b for b, i in zip(s.boxes, s.box_images) if i == k]
                per.append(Localisation(box_map(shape, boxes), "support") if boxes else None)
            out.append(per)
        return out


class HeatmapLocaliser:
    """``field``: the record field naming a heat map (one path, or one per image, relative to the
    input root); ``score_field``: the record field with the localiser's disease probability."""

    name = "heatmap"

    def __init__(self, field: str = "heatmap", score_field: str | None = "heatmap_score"):
        self.field, self.score_field = field, score_field

    def paths(self, s: Sample, ctx) -> list[str | None]:
        hm = s.meta.get(self.field)
        if hm is None:
            return [None] * len(s.images)
        hms = hm if isinstance(hm, list) else [hm] + [None] * (len(s.images) - 1)
        root = getattr(ctx, "input_root", None) or Path(".")
        return [str((Path(root) / h).resolve()) if isinstance(h, str) else None for h in hms]

    def __call__(self, samples: list[Sample], shapes, ctx) -> list[list[Localisation | None]]:
        out = []
        for s, sh in zip(samples, shapes):
            score = s.meta.get(self.score_field) if self.score_field else None
            conf = float(score) if isinstance(score, (int, float)) and math.isfinite(score) else math.nan
            out.append(
                [
                    Localisation(load_heatmap(p, shape), "official", conf) if p else None
                    for p, shape in zip(self.paths(s, ctx), sh)
                ]
            )
        return out


class AttentionLocaliser:
    """The policy's attention from its answer tokens to the image patches (the model of the curate
    run's ``model`` group: ``model.init_from=<SFT run>``). ``answer``: ``reference`` (the record's
    answer, teacher-forced: the text the visual pair keeps) or ``generated`` (its greedy answer)."""

    name = "attention"

    def __init__(self, answer: str = "reference", batch_size: int = 8, max_new_tokens: int = 48):
        if answer not in ("reference", "generated"):
            raise ValueError(f"localiser.answer must be 'reference' or 'generated', got {answer!r}")
        self.answer, self.batch_size, self.max_new_tokens = answer, int(batch_size), int(max_new_tokens)

    def __call__(self, samples: list[Sample], shapes, ctx) -> list[list[Localisation | None]]:
        bb = ctx.backbone()
        out = []
        for i in range(0, len(samples), self.batch_size):
            chunk = samples[i : i + self.batch_size]
            grids = patch_heat(bb, chunk, self.answer, self.max_new_tokens)
            for s, sh, g in zip(chunk, shapes[i : i + self.batch_size], grids):
                out.append(heat_on_images(bb, s, sh, g))
        return out


class AutoLocaliser:
    """Boxes when the record has them, else its heat map file, else the policy's attention."""

    name = "auto"

    def __init__(self, heatmap: HeatmapLocaliser | None = None, attention: AttentionLocaliser | None = None):
        self.boxes, self.heatmap = BoxLocaliser(), heatmap or HeatmapLocaliser()
        self.attention = attention or AttentionLocaliser()

    def __call__(self, samples: list[Sample], shapes, ctx) -> list[list[Localisation | None]]:
        kinds = [
            "boxes" if s.boxes else "heatmap" if s.meta.get(self.heatmap.field) is not None else "attention"
            for s in samples
        ]
        out: list = [None] * len(samples)
        for kind, loc in (("boxes", self.boxes), ("heatmap", self.heatmap), ("attention", self.attention)):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            if idx:
                for i, r in zip(idx, loc([samples[i] for i in idx], [shapes[i] for i in idx], ctx)):
                    out[i] = r
        return out


def make_localiser(spec):
    """The localiser ``spec`` describes: ``None`` (:class:`AutoLocaliser`), a ready object, or a
    ``{_target_: unveil.curate.localisers.<Class>, <its options>}`` config (a typo fails, naming it)."""
    if spec is None:
        return AutoLocaliser()
    if hasattr(spec, "keys"):
        from unveil.utils.plug import instantiate

        return instantiate(spec, "builder.localiser")
    return spec


# --- the policy's attention ------------------------------------------------------------------------


def _answer_ids(bb, samples, batch, answer: str, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, T] answer token ids (right-padded) and their mask: the reference in the model's box format
    and frame, or the model's greedy answer."""
    from unveil.data.collate import backbone_messages
    from unveil.models.generation import generate

    if answer == "generated":
        out = generate(bb, batch, max_new_tokens=max_new_tokens)
        return out["completion_ids"].cpu(), out["completion_mask"].cpu().long()
    tok = bb.tokenizer
    enc = [tok(backbone_messages(bb, s)[-1]["content"], add_special_tokens=False)["input_ids"] for s in samples]
    t = max(1, max(len(e) for e in enc))
    ids = torch.full((len(enc), t), tok.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros((len(enc), t), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)], mask[i, : len(e)] = torch.tensor(e, dtype=torch.long), 1
    return ids, mask


@torch.no_grad()
def patch_heat(bb, samples: list[Sample], answer: str = "reference", max_new_tokens: int = 48):
    """Per sample, per image: the (gh, gw) attention mass of its answer tokens on each patch of the
    model's image (None where the backbone's image-token layout is unknown)."""
    from unveil.data.collate import PromptCollator
    from unveil.models.inputs import model_inputs
    from unveil.models.policy import key_mass
    from unveil.rewards.vision_relevance import image_grids

    device = next(bb.model.parameters()).device
    batch = PromptCollator(bb)(samples)
    inputs = {k: v.to(device) for k, v in model_inputs(dict(batch)).items()}
    ids, mask = _answer_ids(bb, samples, {**inputs, "samples": samples}, answer, max_new_tokens)
    layouts = image_grids(bb, batch["input_ids"].cpu(), samples, batch.get("image_grid_thw"))
    n, p = batch["input_ids"].shape
    k_total = max((sum(gh * gw for _, gh, gw in lay) for lay in layouts if lay), default=0)
    if k_total == 0:
        return [None] * len(samples)
    weights = torch.zeros(n, p + ids.shape[1], k_total)
    for r, lay in enumerate(layouts):
        col = 0
        for pos, gh, gw in lay or []:
            weights[r, pos, torch.arange(col, col + gh * gw)] = 1.0
            col += gh * gw
    mass, _ = key_mass(bb.model, inputs, ids.to(device), mask.to(device), weights.to(device))
    per_token = mass.float().mean(dim=(0, 2))[:, 1:]  # [N, T, K]: row c + 1 is answer token c's own query
    m = mask.float().unsqueeze(-1)
    heat = (per_token * m).sum(1) / m.sum(1).clamp_min(1.0)  # [N, K]
    out = []
    for r, lay in enumerate(layouts):
        if lay is None:
            out.append(None)
            continue
        grids, col = [], 0
        for _pos, gh, gw in lay:
            grids.append(heat[r, col : col + gh * gw].reshape(gh, gw).numpy())
            col += gh * gw
        out.append(grids)
    return out


def heat_on_images(bb, s: Sample, shapes, grids) -> list[Localisation | None]:
    """Patch-grid heat of each image resampled (bilinear) onto its original pixels through its frame."""
    from scipy.ndimage import map_coordinates

    from unveil.data.frames import sample_frames

    if grids is None:
        return [None] * len(shapes)
    frames = sample_frames(bb, s.images, [(w, h) for h, w in shapes])
    out = []
    for g, (h, w), f in zip(grids, shapes, frames):
        gh, gw = g.shape
        u = ((np.arange(w) + 0.5) / w) * f.sx + f.ox  # pixel centres in the model's image, normalised
        v = ((np.arange(h) + 0.5) / h) * f.sy + f.oy
        gy, gx = np.meshgrid(v * gh - 0.5, u * gw - 0.5, indexing="ij")
        heat = map_coordinates(g.astype(np.float64), [gy, gx], order=1, mode="nearest").astype(np.float32)
        out.append(Localisation(np.clip(heat, 0, None), "official"))
    return out
