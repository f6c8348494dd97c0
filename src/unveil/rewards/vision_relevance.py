"""Vision-relevance rewards: does the answer's naming of the abnormality rest on the lesion pixels?

:class:`VisionRelevanceReward` is UMed-LVLM's third reward, the attention mass that the answer
tokens naming the finding put on the image-patch tokens inside the ground-truth box::

    r_att = 1/|N| sum_{i in N} sum_{j in Nbar} softmax_k(q_i . k_k / sqrt(d))_j

- ``N``: completion tokens whose characters overlap a finding word (any term of the finding
  vocabulary or of the sample's own labels, plural ``s``/``es`` included) in the decoded
  completion; characters are mapped to tokens by incremental decoding of the generated ids (or
  the tokenizer's offsets when the batch carries only texts).
- ``Nbar``: image tokens whose patch centre lies inside a ground-truth box of that image (the
  patch holding the box centre when a box is smaller than a patch). The image tokens of a
  LLaVA-style model are a contiguous run of ``grid x grid`` tokens in row-major patch order per
  image, ``grid = vision image_size // patch_size`` (a perfect-square run otherwise), followed by
  the conv tower's ``slot_tokens`` when it has any (they are not patches); Qwen2-VL
  grids come from ``image_grid_thw`` and the spatial merge size. Any other layout gives NaN.
- the softmax runs over all keys (text, image and the attention sink), as the model computes it;
  the attention probabilities are averaged over the configured ``layers`` and ``heads`` (default:
  all).
- **Normalisation by |N|** (our choice; the paper's formula is a plain sum over i): the sum grows
  with the number of finding tokens, so it would pay the policy to repeat the finding's name or
  to name it with more sub-word pieces. The mean over the finding tokens keeps r_att in [0, 1]
  and makes it a property of *where* the model looks, not of how often it says the word.
- ``query: token`` (default) reads the attention row of the finding token itself (``q_i`` of the
  formula, literally); ``query: predict`` reads the row of the position that emitted it.

Scores: NaN for normal studies and for tasks not in ``tasks`` (default ``localize``), and for
batches without model inputs; 0 when the completion names no finding.

The mass comes from one extra forward pass of the policy (``torch.no_grad``, eval mode, the
prompt once per group) with sdpa attention: :func:`unveil.models.policy.key_mass` computes, for
the completion queries only, the softmax mass on the box keys, so no attention map is ever held
(``[layers, N, heads, T + 1]`` floats are kept). The pass (and the completion log-probs it
yields) is shared through ``batch.cache`` so two heads never both run it.

:class:`VisionCounterfactualReward` is the counterfactual variant: the mean per-token
log-probability of the completion given the real image minus given the image with the
ground-truth region filled with grey, ``1/T sum_t log p(y_t | y_<t, x) - log p(y_t | y_<t, x_masked)``,
both passes under ``torch.no_grad``. Positive when the answer depends on the lesion pixels.
The mask is applied to ``pixel_values`` of shape ``[images, C, H, W]``, with the boxes mapped into
the image as the processor got it (padded to a square under ``model.image_aspect: pad``,
:mod:`unveil.data.frames`), which assumes the processor then resizes that whole image (SigLIP/LLaVA,
the tiny model, CLIP on a square); flattened-patch processors (Qwen2-VL) are not supported (NaN).

Both heads map the ground-truth boxes into the model's frame the same way, so the patch mask of a
non-square image under ``pad`` is the box's patches in the padded square.
"""

from __future__ import annotations

import math
import re
from typing import ClassVar

import torch

from unveil.data.frames import sample_frames
from unveil.models.inputs import model_inputs, select_inputs
from unveil.models.policy import completion_logprobs, eval_mode, key_mass, row_chunks, unwrap
from unveil.rewards._common import applies, task_set, warn_once
from unveil.rewards.base import RewardHead, Rollout

FORWARD_KEY = "policy_forward"  # batch.cache entry shared by the heads that run the policy
_NAN = float("nan")


# --- running the policy (unveil.models.policy) -----------------------------------------------------


def _image_token_id(backbone) -> int | None:
    cfg = unwrap(backbone.model).config
    for k in ("image_token_id", "image_token_index"):
        v = getattr(cfg, k, None)
        if v is not None:
            return int(v)
    return None


@torch.no_grad()
def run_policy(
    backbone,
    batch: Rollout,
    key_weights: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    chunk_size: int = 8,
) -> dict:
    """The policy over prompt + completion, in eval mode, the prompt once per group.

    Returns ``token_logps`` [N, T] (log-prob of each completion token) and, when ``key_weights``
    [N, P + T] is given, ``key_mass`` [layers, N, heads, T + 1]: the attention mass that the
    queries at positions ``P-1 .. P+T-1`` put on the weighted keys. ``pixel_values`` replaces the
    batch's (counterfactual images). ``chunk_size`` completions per pass (whole groups together).
    """
    model = backbone.model
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in model_inputs(dict(batch.inputs)).items()}
    if pixel_values is not None:
        inputs["pixel_values"] = pixel_values.to(device)
    if inputs.get("pixel_values") is not None and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    comp = batch.completion_ids.long().to(device)
    cmask = (batch.completion_mask if batch.completion_mask is not None else torch.ones_like(comp)).to(device)
    # an image placeholder inside a completion would ask the model for an image it does not have:
    # the pass sees padding there, and the heads score that row NaN (image_token_rows)
    image_ids = torch.tensor(backbone.image_token_ids or [-1], device=device)
    placeholder = torch.isin(comp, image_ids)
    bad_rows = (placeholder & cmask.bool()).any(1).cpu()
    comp = comp.masked_fill(placeholder, backbone.tokenizer.pad_token_id or 0)
    n_images = [len(getattr(s, "images", []) or []) for s in batch.samples]
    group = batch.group if batch.group is not None and len(batch.group) == len(comp) else None
    logps, masses = [], []
    chunks = row_chunks(group, len(comp), max(1, int(chunk_size)))
    for rows in chunks:
        sub = select_inputs(inputs, rows, n_images)
        args = (sub, comp[rows], cmask[rows])
        kw = dict(group=None if group is None else group[rows], n_images=[n_images[i] for i in rows.tolist()])
        if key_weights is None:
            with eval_mode(model):
                logps.append(completion_logprobs(model, *args, **kw).logps.cpu())
        else:
            mass, lp = key_mass(model, *args, key_weights[rows].to(device), **kw)
            masses.append(mass)
            logps.append(lp)
    order = torch.cat(chunks).argsort()
    res = {
        "token_logps": torch.cat(logps)[order],
        "mask": cmask.cpu().float(),
        "prompt_len": inputs["input_ids"].shape[1],
        "image_token_rows": bad_rows,
    }
    if key_weights is not None:
        res["key_mass"] = torch.cat(masses, 1)[:, order]
    return res


# --- image-token layout and box patches ---------------------------------------------------------


def patch_mask(boxes, gh: int, gw: int) -> torch.Tensor:
    """[gh * gw] bool, row-major: patches whose centre is inside any box (or holding its centre)."""
    m = torch.zeros(gh, gw, dtype=torch.bool)
    cy = (torch.arange(gh, dtype=torch.float64) + 0.5) / gh
    cx = (torch.arange(gw, dtype=torch.float64) + 0.5) / gw
    for b in boxes:
        x1, y1, x2, y2 = (float(v) for v in b)
        inside = ((cy >= y1) & (cy <= y2))[:, None] & ((cx >= x1) & (cx <= x2))[None, :]
        if not inside.any():
            r = min(gh - 1, max(0, int((y1 + y2) / 2 * gh)))
            c = min(gw - 1, max(0, int((x1 + x2) / 2 * gw)))
            inside[r, c] = True
        m |= inside
    return m.reshape(-1)


def image_grids(backbone, input_ids: torch.Tensor, samples, grid_thw: torch.Tensor | None = None):
    """Per row: a list of (token positions [k], gh, gw) for each image in that row, or None."""
    tid = _image_token_id(backbone)
    if tid is None:
        return [None] * input_ids.shape[0]
    cfg = unwrap(backbone.model).config
    vc = getattr(cfg, "vision_config", None)
    g = None
    if vc is not None and getattr(vc, "image_size", None) and getattr(vc, "patch_size", None):
        size, patch = vc.image_size, vc.patch_size
        size = size if isinstance(size, int) else size[0]
        patch = patch if isinstance(patch, int) else patch[0]
        g = int(size) // int(patch)
    # tokens after each image's patches that are not patches (the conv tower's slot tokens)
    extra = int(getattr(vc, "slot_tokens", 0) or 0) if vc is not None else 0
    merge = int(getattr(vc, "spatial_merge_size", 1) or 1) if vc is not None else 1
    out, ptr = [], 0
    for r in range(input_ids.shape[0]):
        pos = (input_ids[r] == tid).nonzero(as_tuple=True)[0]
        k = pos.numel()
        n_img = len(getattr(samples[r], "images", []) or []) if samples is not None else 1
        grids = None
        if k == 0:
            grids = None
        elif grid_thw is not None:
            thw = grid_thw[ptr : ptr + n_img]
            ptr += n_img
            dims = [(int(h) // merge, int(w) // merge) for _t, h, w in thw.tolist()]
            if sum(int(t) * h * w for (t, _, _), (h, w) in zip(thw.tolist(), dims)) == k and all(
                int(t) == 1 for t, _, _ in thw.tolist()
            ):
                grids = dims
        elif g and k % (g * g + extra) == 0:
            grids = [(g, g)] * (k // (g * g + extra))
        elif not extra and math.isqrt(k) ** 2 == k:
            grids = [(math.isqrt(k), math.isqrt(k))]
        if grids is None:
            out.append(None)
            continue
        items, start = [], 0
        for gh, gw in grids:
            items.append((pos[start : start + gh * gw], gh, gw))
            start += gh * gw + extra
        out.append(items)
    return out


def box_key_weights(backbone, batch: Rollout) -> tuple[torch.Tensor, list[bool]]:
    """[N, P + T] float: 1 on the image tokens inside the GT boxes; and whether each row has a layout."""
    inputs = batch.inputs
    ids = inputs["input_ids"].cpu()
    n, p = ids.shape
    t = batch.completion_ids.shape[1]
    w = torch.zeros(n, p + t)
    ok = []
    layouts = image_grids(backbone, ids, batch.samples, inputs.get("image_grid_thw"))
    for r, lay in enumerate(layouts):
        s = batch.samples[r]
        if lay is None:
            ok.append(False)
            continue
        bimg = list(s.box_images) if s.box_images else [0] * len(s.boxes)
        frames = sample_frames(backbone, s.images) if s.images else []
        for k, (pos, gh, gw) in enumerate(lay):
            # the patch grid covers the image as the model sees it (padded to a square, say)
            boxes = [frames[k].to_model(b) if k < len(frames) else b for b, bi in zip(s.boxes, bimg) if bi == k]
            if boxes:
                w[r, pos[patch_mask(boxes, gh, gw)]] = 1.0
        ok.append(bool(w[r].any()))
    return w, ok


# --- finding tokens -----------------------------------------------------------------------------


def finding_pattern(terms) -> re.Pattern | None:
    terms = sorted({str(t).strip() for t in terms if str(t).strip()}, key=len, reverse=True)
    if not terms:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(t) for t in terms) + r")(?:e?s)?(?!\w)", re.I)


def token_char_spans(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """Decoded text of ``ids`` and each token's character span in it, by incremental decoding."""
    if not ids:
        return "", []
    prefixes = tokenizer.batch_decode([ids[: k + 1] for k in range(len(ids))], skip_special_tokens=True)
    text = prefixes[-1]
    spans, prev = [], 0
    for pre in prefixes:
        end = len(pre) if text.startswith(pre) else _common_prefix(pre, text)
        end = max(prev, min(end, len(text)))
        spans.append((prev, end))
        prev = end
    return text, spans


def _common_prefix(a: str, b: str) -> int:
    i = 0
    for x, y in zip(a, b):
        if x != y:
            break
        i += 1
    return i


def finding_token_mask(tokenizer, ids: list[int], pattern: re.Pattern | None) -> list[bool]:
    """For each token: does it overlap a finding word of the decoded text?"""
    text, spans = token_char_spans(tokenizer, ids)
    if pattern is None:
        return [False] * len(ids)
    hits = [(m.start(), m.end()) for m in pattern.finditer(text)]
    return [any(a < he and hs < b for hs, he in hits) and b > a for a, b in spans]


def _ensure_ids(bb, batch: Rollout) -> bool:
    """Tokenise the texts when the batch has no generated ids (heads called on plain texts)."""
    if batch.completion_ids is not None:
        return True
    if bb is None:
        return False
    tok = bb.tokenizer
    enc = [tok(c if isinstance(c, str) else "", add_special_tokens=False)["input_ids"] for c in batch.texts]
    t = max(1, max((len(e) for e in enc), default=1))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(enc), t), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), t), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e, dtype=torch.long)
        mask[i, : len(e)] = 1
    batch.completion_ids, batch.completion_mask = ids, mask
    return True


def _has_model_inputs(backbone, batch: Rollout) -> bool:
    pi = batch.inputs
    return backbone is not None and pi is not None and "input_ids" in pi and "attention_mask" in pi


class VisionRelevanceReward(RewardHead):
    name: ClassVar[str] = "vision_relevance"
    needs: ClassVar[frozenset[str]] = frozenset({"model"})

    def __init__(
        self,
        layers: list[int] | None = None,
        heads: list[int] | None = None,
        query: str = "token",
        chunk_size: int = 8,
        tasks: list[str] | str | None = ("localize",),
    ):
        if query not in ("token", "predict"):
            raise ValueError(f"vision_relevance.query must be token or predict, got {query!r}")
        self.layers = None if layers is None else [int(l) for l in layers]
        self.heads = None if heads is None else [int(h) for h in heads]
        self.query = query
        self.chunk_size = int(chunk_size)
        self.tasks = task_set(tasks)

    def key_mass(self, batch: Rollout) -> torch.Tensor | None:
        """[layers, N, heads, T + 1] attention mass on the GT-box image tokens (cached per batch)."""
        cache = batch.cache.setdefault(FORWARD_KEY, {})
        if "key_mass" not in cache:
            w, ok = box_key_weights(self.backbone, batch)
            if not any(ok):
                warn_once(
                    "vision_relevance:layout",
                    "vision_relevance: no image-token layout found for this backbone; scored NaN",
                )
                cache["key_mass"], cache["key_ok"] = None, ok
                return None
            res = run_policy(self.backbone, batch, key_weights=w, chunk_size=self.chunk_size)
            cache.update(res)
            cache["key_ok"] = ok
        return cache["key_mass"]

    def __call__(self, batch: Rollout) -> torch.Tensor:
        n = len(batch)
        out = torch.full((n,), _NAN, dtype=torch.float32)
        rows = [i for i, s in enumerate(batch.samples) if applies(self.tasks, s.task) and s.boxes]
        if not rows or not _has_model_inputs(self.backbone, batch):
            return out
        try:
            if not _ensure_ids(self.backbone, batch):
                return out
            mass = self.key_mass(batch)
            if mass is None:
                return out
            ok = batch.cache[FORWARD_KEY]["key_ok"]
            m = mass
            if self.layers is not None:
                m = m[torch.tensor(self.layers) % mass.shape[0]]
            if self.heads is not None:
                m = m[:, :, torch.tensor(self.heads) % mass.shape[2]]
            m = m.mean(dim=(0, 2))  # [N, T + 1]
            tok = self.backbone.tokenizer
            vocab = set(self.vocab)
            cmask = (
                batch.completion_mask if batch.completion_mask is not None else torch.ones_like(batch.completion_ids)
            )
            for i in rows:
                if not ok[i]:
                    continue
                L = int(cmask[i].sum())
                ids = batch.completion_ids[i][cmask[i].bool()].tolist()[:L]
                pat = finding_pattern(vocab | set(batch.samples[i].findings))
                hit = finding_token_mask(tok, ids, pat)
                ks = [k for k, h in enumerate(hit) if h]
                if not ks:
                    out[i] = 0.0
                    continue
                pos_in_valid = torch.nonzero(cmask[i].bool(), as_tuple=True)[0]
                # row index into m: token k at completion index c sits at row c + 1; its predictor at row c
                sel = torch.tensor([int(pos_in_valid[k]) + (1 if self.query == "token" else 0) for k in ks])
                v = float(m[i, sel].mean())
                out[i] = min(max(v, 0.0), 1.0) if math.isfinite(v) else _NAN
            out[batch.cache[FORWARD_KEY]["image_token_rows"]] = _NAN
        except Exception as e:  # noqa: BLE001  (never raise in a training step)
            warn_once(
                f"vision_relevance:{type(e).__name__}",
                "vision_relevance failed (%s: %s); scored NaN",
                type(e).__name__,
                e,
            )
            return torch.full((n,), _NAN, dtype=torch.float32)
        return out


# --- counterfactual variant ---------------------------------------------------------------------


def grey_value(processor, dtype=torch.float32, fill: float = 0.5) -> torch.Tensor:
    """Per-channel value of a raw ``fill`` intensity after the image processor's normalisation."""
    ip = getattr(processor, "image_processor", None)
    mean = getattr(ip, "image_mean", None) if ip is not None else None
    std = getattr(ip, "image_std", None) if ip is not None else None
    if mean is None or std is None or not getattr(ip, "do_normalize", True):
        return torch.tensor([fill] * 3, dtype=dtype)
    return ((torch.tensor([fill] * len(mean)) - torch.tensor(mean)) / torch.tensor(std)).to(dtype)


def mask_pixel_values(pixel_values: torch.Tensor, samples, value: torch.Tensor, backbone=None) -> torch.Tensor | None:
    """Copy of ``[images, C, H, W]`` pixel values with the GT boxes of each sample filled; None if unsupported.
    With ``backbone`` the boxes are mapped into the image as its processor got it (padding)."""
    if not torch.is_tensor(pixel_values) or pixel_values.dim() != 4:
        return None
    counts = [len(s.images or []) for s in samples]
    if sum(counts) != pixel_values.shape[0]:
        return None
    pv = pixel_values.clone()
    _, c, h, w = pv.shape
    val = value.to(pv.dtype).to(pv.device)
    val = val[:c] if val.numel() >= c else val.new_full((c,), float(val.mean()))
    start = 0
    for s, k in zip(samples, counts):
        bimg = list(s.box_images) if s.box_images else [0] * len(s.boxes)
        frames = sample_frames(backbone, s.images) if backbone is not None and s.images else []
        for b, bi in zip(s.boxes, bimg):
            if not 0 <= bi < k:
                continue
            x1, y1, x2, y2 = frames[bi].to_model(b) if bi < len(frames) else (float(v) for v in b)
            c1, c2 = max(0, math.floor(x1 * w)), min(w, max(math.ceil(x2 * w), math.floor(x1 * w) + 1))
            r1, r2 = max(0, math.floor(y1 * h)), min(h, max(math.ceil(y2 * h), math.floor(y1 * h) + 1))
            pv[start + bi, :, r1:r2, c1:c2] = val[:, None, None]
        start += k
    return pv


class VisionCounterfactualReward(RewardHead):
    name: ClassVar[str] = "vision_counterfactual"
    needs: ClassVar[frozenset[str]] = frozenset({"model"})

    def __init__(
        self, fill: float = 0.5, clip: float = 10.0, chunk_size: int = 8, tasks: list[str] | str | None = ("localize",)
    ):
        self.fill = float(fill)
        self.clip = float(clip)
        self.chunk_size = int(chunk_size)
        self.tasks = task_set(tasks)

    def __call__(self, batch: Rollout) -> torch.Tensor:
        n = len(batch)
        out = torch.full((n,), _NAN, dtype=torch.float32)
        rows = [i for i, s in enumerate(batch.samples) if applies(self.tasks, s.task) and s.boxes]
        if not rows or not _has_model_inputs(self.backbone, batch) or "pixel_values" not in batch.inputs:
            return out
        try:
            if not _ensure_ids(self.backbone, batch):
                return out
            cache = batch.cache.setdefault(FORWARD_KEY, {})
            if "token_logps" not in cache:
                cache.update(run_policy(self.backbone, batch, chunk_size=self.chunk_size))
            real = cache["token_logps"]
            key = f"counterfactual_logps@{self.fill:g}"
            if key not in batch.cache:
                pv = batch.inputs["pixel_values"]
                grey = grey_value(self.backbone.processor, fill=self.fill)
                masked = mask_pixel_values(pv, batch.samples, grey, self.backbone)
                if masked is None:
                    warn_once(
                        "vision_counterfactual:layout",
                        "vision_counterfactual: pixel_values of shape %s not supported; NaN",
                        tuple(pv.shape),
                    )
                    batch.cache[key] = None
                else:
                    batch.cache[key] = run_policy(
                        self.backbone, batch, pixel_values=masked, chunk_size=self.chunk_size
                    )["token_logps"]
            cf = batch.cache[key]
            if cf is None:
                return out
            mask = cache["mask"]
            gap = ((real - cf) * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
            for i in rows:
                v = float(gap[i])
                out[i] = min(max(v, -self.clip), self.clip) if math.isfinite(v) else _NAN
            out[cache["image_token_rows"]] = _NAN
        except Exception as e:  # noqa: BLE001
            warn_once(
                f"vision_counterfactual:{type(e).__name__}",
                "vision_counterfactual failed (%s: %s); scored NaN",
                type(e).__name__,
                e,
            )
            return torch.full((n,), _NAN, dtype=torch.float32)
        return out
