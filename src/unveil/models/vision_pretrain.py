"""Warm up a from-scratch vision tower before SFT, the way real VLMs start from a pretrained one.

LLaVA-style models never learn their vision encoder from a language loss alone: they start
from CLIP/SigLIP. The tiny model built in code has no such encoder, and through the LM the
gradient that reaches a random tower is too weak to learn lesion features in CPU minutes.
This step trains the tower (only) on the *training split* with dense per-patch targets:

- class of each patch: background or the finding whose box covers it (cross-entropy);
- for lesion patches, the box's four edges as Fourier features (:mod:`coord_features`),
  scored against every grid value and trained with cross-entropy:
  the same code the number tokens of the box grid start from, so SFT only has to learn a
  linear copy from the lesion's tokens to the coordinates it writes.

Both heads are thrown away afterwards; the tower's patch tokens then carry "lesion here, of
this type, with these edges", which the language model learns to read during SFT.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from unveil.models.coord_features import N_FREQ, fourier

log = logging.getLogger(__name__)


def _centres(grid: int):
    centres = (torch.arange(grid) + 0.5) / grid
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    return cx.reshape(-1), cy.reshape(-1)


def _box_patches(b, cx, cy, grid: int) -> torch.Tensor:
    """[grid * grid] bool: patches whose centre is inside the box; a box smaller than a patch
    still owns the patch holding its centre."""
    x1, y1, x2, y2 = b
    inside = (cx >= x1) & (cx <= x2) & (cy >= y1) & (cy <= y2)
    inside[int(min(grid - 1, (y1 + y2) / 2 * grid)) * grid + int(min(grid - 1, (x1 + x2) / 2 * grid))] = True
    return inside


def slot_targets(samples, grid: int, slots: int):
    """Per image and slot k: the patches of box k in reading order (B, K, N), its edges (B, K, 4)
    and whether it exists (B, K). Reading order is the synthetic answers' (x1, then y1)."""
    mask = torch.zeros(len(samples), slots, grid * grid, dtype=torch.bool)
    box = torch.zeros(len(samples), slots, 4)
    cx, cy = _centres(grid)
    for i, s in enumerate(samples):
        on_image = [b for k, b in enumerate(s.boxes) if not s.box_images or s.box_images[k] == 0]
        for k, b in enumerate(sorted(on_image, key=lambda b: (b[0], b[1]))[:slots]):
            mask[i, k], box[i, k] = _box_patches(b, cx, cy, grid), torch.tensor(list(b), dtype=torch.float32)
    return mask, box, mask.any(-1)


def patch_targets(samples, grid: int, classes: list[str]):
    """Per patch: class id (0 = background), the covering box (xyxy), whether it belongs to the
    first box in reading order; per image: that first box (zeros for a normal study)."""
    cls = torch.zeros(len(samples), grid * grid, dtype=torch.long)
    box = torch.zeros(len(samples), grid * grid, 4)
    first = torch.zeros(len(samples), grid * grid, dtype=torch.bool)
    first_box = torch.zeros(len(samples), 4)
    cx, cy = _centres(grid)
    for i, s in enumerate(samples):
        # larger boxes first, so a small lesion inside a big one keeps its own patches
        order = sorted(
            range(len(s.boxes)), key=lambda k: -(s.boxes[k][2] - s.boxes[k][0]) * (s.boxes[k][3] - s.boxes[k][1])
        )
        on_image = [k for k in range(len(s.boxes)) if not s.box_images or s.box_images[k] == 0]
        lead = min(on_image, key=lambda k: (s.boxes[k][0], s.boxes[k][1])) if on_image else None
        for k in order:
            if s.box_images and s.box_images[k] != 0:
                continue
            x1, y1, x2, y2 = s.boxes[k]
            inside = _box_patches(s.boxes[k], cx, cy, grid)
            label = classes.index(s.findings[k]) + 1 if s.findings and s.findings[k] in classes else 1
            cls[i, inside] = label
            box[i, inside] = torch.tensor([x1, y1, x2, y2])
            if k == lead:
                first[i], first_box[i] = inside, torch.tensor([x1, y1, x2, y2])
    return cls, box, first, first_box


def code_scores(code: torch.Tensor, grid: int = 100) -> torch.Tensor:
    """(..., 4 * 2F) Fourier box code -> (..., 4, grid + 1) a score per edge and grid value,
    the same dot product the number tokens' output rows compute in the language model."""
    table = fourier(torch.arange(grid + 1, device=code.device) / grid)  # (grid + 1, 2F)
    return code.unflatten(-1, (4, table.shape[1])) @ table.T


def decode_code(code: torch.Tensor, grid: int = 100) -> torch.Tensor:
    """(..., 4 * 2F) Fourier box code -> (..., 4) xyxy in [0, 1], each edge the best grid value."""
    return code_scores(code, grid).argmax(-1) / grid


def code_loss(code: torch.Tensor, boxes: torch.Tensor, grid: int = 100, sigma: float = 1.5) -> torch.Tensor:
    """Cross-entropy of the decoded edge scores against a Gaussian around each true edge (in
    grid units): trains exactly what is read out, with partial credit for near misses."""
    values = torch.arange(grid + 1, device=code.device, dtype=torch.float32)
    target = torch.exp(-0.5 * ((values - boxes.unsqueeze(-1) * grid) / sigma) ** 2)
    target = target / target.sum(-1, keepdim=True)
    return -(target * code_scores(code, grid).log_softmax(-1)).sum(-1).mean()


def _pixels(processor, studies, images, device) -> torch.Tensor:
    """The first image of each study, as the processor prepares it for the tower."""
    pv = processor.image_processor([images(s.images[0]) for s in studies], return_tensors="pt")["pixel_values"]
    return pv.to(device)


def _abnormal_batches(tower, processor, samples, images, batch_size: int):
    """(studies, tower.encode outputs) over up to 512 abnormal localisation studies, in eval mode."""
    abnormal = [s for s in samples if s.images and s.task == "localize" and s.boxes][:512]
    was = tower.training
    tower.eval()
    device = next(tower.parameters()).device
    try:
        for i in range(0, len(abnormal), batch_size):
            chunk = abnormal[i : i + batch_size]
            yield chunk, tower.encode(_pixels(processor, chunk, images, device))
    finally:
        tower.train(was)


@torch.no_grad()
def pooled_box_iou(tower, head_box, processor, samples, images, batch_size: int = 64) -> float:
    """Mean IoU of the pooled token's decoded box against the first box, on abnormal studies."""
    from unveil.data.boxes import iou_matrix

    if not hasattr(tower, "encode"):
        return float("nan")
    ious = []
    for chunk, (_, _, _, pooled) in _abnormal_batches(tower, processor, samples, images, batch_size):
        for s, p in zip(chunk, decode_code(head_box(pooled)).cpu().tolist()):
            ious.append(float(iou_matrix([p], [min(s.boxes, key=lambda b: (b[0], b[1]))])[0, 0]))
    return sum(ious) / len(ious) if ious else float("nan")


def slot_loss(tower, head_box, head_present, tokens, mask, boxes, present) -> torch.Tensor:
    """Slot k points at box k's patches, pools what decodes to its edges, and says whether box k
    exists. ``tokens``: the normed patch tokens (B, N, C); targets from :func:`slot_targets`."""
    logits, pooled = tower.slots(tokens)  # (B, K, N), (B, K, C)
    loss = nn.functional.binary_cross_entropy_with_logits(
        logits, mask.float(), pos_weight=torch.tensor(5.0, device=tokens.device)
    )
    loss = loss + nn.functional.binary_cross_entropy_with_logits(head_present(pooled).squeeze(-1), present.float())
    if present.any():
        loss = loss + 0.5 * code_loss(head_box(pooled[present]), boxes[present])
    return loss


@torch.no_grad()
def slot_box_iou(tower, head_box, processor, samples, images, slots: int, batch_size: int = 64) -> list[float]:
    """Per slot k: mean IoU of its decoded box against box k in reading order, where box k exists."""
    from unveil.data.boxes import iou_matrix

    grid = tower.config.image_size // tower.config.patch_size
    ious: list[list[float]] = [[] for _ in range(slots)]
    for chunk, (tokens, *_) in _abnormal_batches(tower, processor, samples, images, batch_size):
        pred = decode_code(head_box(tower.slots(tokens)[1])).cpu()  # (B, K, 4)
        _, gt, present = slot_targets(chunk, grid, slots)
        for b, k in present.nonzero().tolist():
            ious[k].append(float(iou_matrix([pred[b, k].tolist()], [gt[b, k].tolist()])[0, 0]))
    return [sum(v) / len(v) if v else float("nan") for v in ious]


@dataclass
class _Heads:
    """The throw-away heads the tower is trained through: per-patch class and box code, and (with
    slot tokens) whether slot k holds a box (a normal or one-box study leaves slots empty)."""

    cls: nn.Linear
    box: nn.Linear
    present: nn.Linear | None

    @classmethod
    def build(cls, hidden: int, n_classes: int, n_slots: int) -> _Heads:
        return cls(
            nn.Linear(hidden, n_classes + 1),
            nn.Linear(hidden, 4 * 2 * N_FREQ),
            nn.Linear(hidden, 1) if n_slots else None,
        )

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.cls, self.box, self.present) if m is not None]

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules() for p in m.parameters()]

    def to(self, device) -> None:
        for m in self.modules():
            m.to(device)


def _warmup_loss(tower, heads: _Heads, pv, batch, grid: int, classes: list[str], weight, n_slots: int):
    """(total loss, class loss, box loss, pooled-box loss) of one batch of images ``pv``."""
    device = pv.device
    cls, box, first, first_box = (t.to(device) for t in patch_targets(batch, grid, classes))
    if hasattr(tower, "encode"):  # the patch tokens alone, without slot tokens after them
        tokens, _, obj, pooled = tower.encode(pv)
    else:
        tokens, obj, pooled = tower(pv, output_hidden_states=True).hidden_states[-1], None, None
    loss_cls = nn.functional.cross_entropy(heads.cls(tokens).flatten(0, 1), cls.flatten(), weight=weight.to(device))
    pos = cls > 0
    loss_box = code_loss(heads.box(tokens)[pos], box[pos]) if pos.any() else tokens.sum() * 0
    loss = loss_cls + 0.5 * loss_box
    loss_pool = torch.zeros(())
    if obj is not None:
        # the pool points at the first box, and what it pools decodes to that box's edges
        abnormal = first.any(1)
        loss_obj = nn.functional.binary_cross_entropy_with_logits(
            obj, first.float(), pos_weight=torch.tensor(5.0, device=device)
        )
        loss_pool = code_loss(heads.box(pooled[abnormal]), first_box[abnormal]) if abnormal.any() else pooled.sum() * 0
        loss = loss + loss_obj + 0.5 * loss_pool
    if n_slots:
        loss = loss + slot_loss(
            tower, heads.box, heads.present, tokens, *(t.to(device) for t in slot_targets(batch, grid, n_slots))
        )
    return loss, loss_cls, loss_box, loss_pool


def _val_stats(tower, head_box, processor, val_samples, images, pooling: bool, n_slots: int) -> dict[str, float]:
    """IoU of the boxes the pooled token and each slot decode to, on ``val_samples``."""
    stats = {}
    if val_samples and pooling:
        stats["vision_warmup/val_pool_iou"] = pooled_box_iou(tower, head_box, processor, val_samples, images)
    if val_samples and n_slots:
        for k, v in enumerate(slot_box_iou(tower, head_box, processor, val_samples, images, n_slots)):
            stats[f"vision_warmup/val_slot{k + 1}_iou"] = v
    return stats


def pretrain_vision_tower(
    backbone,
    samples,
    steps: int = 400,
    lr: float = 3e-4,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
    val_samples=None,
) -> dict[str, float]:
    """Train ``backbone``'s vision tower in place; returns the final losses (and, given
    ``val_samples``, the IoU of the box the pooled token decodes to: is the tower any good?)."""
    model = backbone.base_model
    tower = model.model.vision_tower
    vcfg = model.config.vision_config
    grid = vcfg.image_size // vcfg.patch_size
    pool = [s for s in samples if s.images and s.task == "localize"]
    if not pool:
        raise ValueError("vision pretraining needs localisation samples (task 'localize') in the training split")
    classes = sorted({f for s in pool for f in s.findings})
    n_slots = int(getattr(vcfg, "slot_tokens", 0) or 0) if hasattr(tower, "slots") else 0
    heads = _Heads.build(vcfg.hidden_size, len(classes), n_slots)
    params = list(tower.parameters()) + heads.parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    from unveil.data.collate import ImageCache

    images, rng = ImageCache(), random.Random(seed)
    # positives are rare (a few patches per image): weight them up
    weight = torch.ones(len(classes) + 1)
    weight[1:] = 5.0
    device = next(tower.parameters()).device
    heads.to(device)
    pooling = bool(getattr(vcfg, "detector_pool", False)) and hasattr(tower, "encode")
    flags = [p.requires_grad for p in tower.parameters()]
    for p in tower.parameters():  # a tower frozen for SFT (model.freeze.vision) is still warmed up
        p.requires_grad_(True)
    tower.train()
    stats = {}
    bar = tqdm(range(steps), desc="vision warm-up", disable=not progress)
    for _ in bar:
        batch = [pool[rng.randrange(len(pool))] for _ in range(batch_size)]
        pv = _pixels(backbone.processor, batch, images, device)
        loss, loss_cls, loss_box, loss_pool = _warmup_loss(tower, heads, pv, batch, grid, classes, weight, n_slots)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        stats = {
            "vision_warmup/cls_loss": loss_cls.item(),
            "vision_warmup/box_loss": loss_box.item(),
            "vision_warmup/pool_box_loss": loss_pool.item(),
        }
        bar.set_postfix(cls=f"{loss_cls.item():.3f}", box=f"{loss_box.item():.3f}", pool=f"{loss_pool.item():.3f}")
    for p, f in zip(tower.parameters(), flags):
        p.requires_grad_(f)
    stats.update(_val_stats(tower, heads.box, backbone.processor, val_samples, images, pooling, n_slots))
    log.info("vision warm-up: %s", stats)
    return stats


def warm_up(backbone, model_cfg, records, seed: int = 0) -> dict[str, float]:
    """``model.vision_pretrain`` for a fresh tower built in code: warm it up on the training split's
    boxes before any stage sees it; returns the warm-up's stats (empty when it does not run)."""
    steps = dict(model_cfg.get("vision_pretrain") or {})
    if steps.get("steps", 0) <= 0:
        return {}
    if not any(s.task == "localize" and s.images for s in records.data["train"]):
        log.warning(
            "model.vision_pretrain skipped: the training split has no 'localize' records to learn "
            "lesion features from, so the tower starts untrained"
        )
        return {}
    return pretrain_vision_tower(
        backbone, records.data["train"], seed=seed, val_samples=records.data.get("val"), **steps
    )
