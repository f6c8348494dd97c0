"""Warm up a from-scratch vision tower before SFT, the way real VLMs start from a pretrained one.

LLaVA-style models never learn their vision encoder from a language loss alone: they start
from CLIP/SigLIP. The tiny model built in code has no such encoder, and through the LM the
gradient that reaches a random tower is too weak to learn lesion features in CPU minutes.
This step trains the tower (only) on the *training split* with dense per-patch targets:

- class of each patch: background or the finding whose box covers it (cross-entropy);
- for lesion patches, the distances from the patch centre to the box edges (L1, FCOS-style).

Both heads are thrown away afterwards; the tower's patch tokens then carry "lesion here, of
this type, with these extents", which the language model learns to read during SFT.
"""

from __future__ import annotations

import logging
import random

import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def patch_targets(samples, grid: int, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, grid*grid) class ids (0 = background) and (B, grid*grid, 4) box-edge distances."""
    cls = torch.zeros(len(samples), grid * grid, dtype=torch.long)
    dist = torch.zeros(len(samples), grid * grid, 4)
    centres = (torch.arange(grid) + 0.5) / grid
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    cx, cy = cx.reshape(-1), cy.reshape(-1)
    for i, s in enumerate(samples):
        # larger boxes first, so a small lesion inside a big one keeps its own patches
        order = sorted(range(len(s.boxes)), key=lambda k: -(s.boxes[k][2] - s.boxes[k][0]) * (s.boxes[k][3] - s.boxes[k][1]))
        for k in order:
            if s.box_images and s.box_images[k] != 0:
                continue
            x1, y1, x2, y2 = s.boxes[k]
            inside = (cx >= x1) & (cx <= x2) & (cy >= y1) & (cy <= y2)
            # a box smaller than a patch still owns the patch holding its centre
            j = int(min(grid - 1, (y1 + y2) / 2 * grid)) * grid + int(min(grid - 1, (x1 + x2) / 2 * grid))
            inside[j] = True
            label = classes.index(s.findings[k]) + 1 if s.findings and s.findings[k] in classes else 1
            cls[i, inside] = label
            dist[i, inside] = torch.stack([cx[inside] - x1, cy[inside] - y1, x2 - cx[inside], y2 - cy[inside]], -1)
    return cls, dist


def pretrain_vision_tower(backbone, samples, steps: int = 400, lr: float = 3e-4, batch_size: int = 32,
                          seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Train ``backbone``'s vision tower in place; returns the final losses."""
    model = backbone.base_model
    tower = model.model.vision_tower
    vcfg = model.config.vision_config
    grid = vcfg.image_size // vcfg.patch_size
    pool = [s for s in samples if s.images and s.task == "localize"]
    if not pool:
        raise ValueError("vision pretraining needs localisation samples (task 'localize') in the training split")
    classes = sorted({f for s in pool for f in s.findings})
    head_cls = nn.Linear(vcfg.hidden_size, len(classes) + 1)
    head_box = nn.Linear(vcfg.hidden_size, 4)
    params = list(tower.parameters()) + list(head_cls.parameters()) + list(head_box.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    from unveil.data.collate import ImageCache

    images, rng = ImageCache(), random.Random(seed)
    # positives are rare (a few patches per image): weight them up
    weight = torch.ones(len(classes) + 1)
    weight[1:] = 5.0
    device = next(tower.parameters()).device
    head_cls.to(device), head_box.to(device)
    flags = [p.requires_grad for p in tower.parameters()]
    for p in tower.parameters():  # a tower frozen for SFT (model.freeze.vision) is still warmed up
        p.requires_grad_(True)
    tower.train()
    stats = {}
    bar = tqdm(range(steps), desc="vision warm-up", disable=not progress)
    for _ in bar:
        batch = [pool[rng.randrange(len(pool))] for _ in range(batch_size)]
        pv = backbone.processor.image_processor([images(s.images[0]) for s in batch], return_tensors="pt")["pixel_values"].to(device)
        cls, dist = patch_targets(batch, grid, classes)
        cls, dist = cls.to(device), dist.to(device)
        tokens = tower(pv, output_hidden_states=True).hidden_states[-1]
        loss_cls = nn.functional.cross_entropy(head_cls(tokens).flatten(0, 1), cls.flatten(), weight=weight.to(device))
        pos = cls > 0
        loss_box = nn.functional.l1_loss(head_box(tokens)[pos], dist[pos]) if pos.any() else tokens.sum() * 0
        loss = loss_cls + 5.0 * loss_box
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        stats = {"vision_warmup/cls_loss": loss_cls.item(), "vision_warmup/box_loss": loss_box.item()}
        bar.set_postfix(cls=f"{stats['vision_warmup/cls_loss']:.3f}", box=f"{stats['vision_warmup/box_loss']:.3f}")
    for p, f in zip(tower.parameters(), flags):
        p.requires_grad_(f)
    log.info("vision warm-up: %s", stats)
    return stats
