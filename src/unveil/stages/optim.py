"""The optimiser and learning-rate schedule every stage uses (``stage.optim``), and their check.

AdamW over four parameter groups (language / vision tower x decayed matrices / undecayed vectors),
the vision tower at ``lr * vision_lr_scale``. The schedule multiplies the learning rate by

    warm-up (step < W):  (step + 1) / W
    constant:            1
    linear:              r + (1 - r) (1 - t)
    cosine:              r + (1 - r) (1 + cos(pi t)) / 2,     t = (step - W) / (total - W),  r = min_lr_ratio

``check_optim`` refuses an unknown key or scheduler with the valid choices, before any work (train()
calls it first) and again when a stage is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULERS = ("cosine", "linear", "constant")
OPTIM_KEYS = {
    "lr": "peak learning rate",
    "weight_decay": "AdamW weight decay (matrices only)",
    "betas": "AdamW betas",
    "warmup_steps": "linear warm-up steps",
    "warmup_ratio": "warm-up as a fraction of the run's optimiser steps (overrides warmup_steps)",
    "min_lr_ratio": "floor of the decay, as a fraction of lr",
    "scheduler": " | ".join(SCHEDULERS),
    "vision_lr_scale": "the vision tower's lr, as a fraction of lr",
    "master_weights": "fp32 | none: fp32 trainable weights under a mixed precision",
}


def check_optim(optim: dict | None) -> dict:
    """``optim`` as a plain dict, or a ValueError naming the unknown key or scheduler and the choices."""
    o = dict(optim or {})
    unknown = sorted(set(o) - set(OPTIM_KEYS))
    if unknown:
        valid = "\n".join(f"  {k}: {v}" for k, v in OPTIM_KEYS.items())
        raise ValueError(f"stage.optim has unknown key(s) {unknown}; the valid keys are:\n{valid}")
    if o.get("scheduler", "cosine") not in SCHEDULERS:
        raise ValueError(f"stage.optim.scheduler={o['scheduler']!r}; expected one of {', '.join(SCHEDULERS)}")
    return o


@dataclass(frozen=True)
class Schedule:
    total: int
    warmup: int
    kind: str = "cosine"
    min_ratio: float = 0.0

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / max(1, self.warmup)
        if self.kind == "constant":
            return 1.0
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        decay = 0.5 * (1 + math.cos(math.pi * t)) if self.kind == "cosine" else 1 - t
        return self.min_ratio + (1 - self.min_ratio) * decay


def schedule_for(optim: dict, total_steps: int) -> Schedule:
    o = check_optim(optim)
    total = max(1, int(total_steps))
    warmup = int(o.get("warmup_steps", 0))
    if o.get("warmup_ratio"):
        warmup = int(float(o["warmup_ratio"]) * total)
    return Schedule(total, warmup, o.get("scheduler", "cosine"), float(o.get("min_lr_ratio", 0.0)))


def build_optimizer(params: list, vision_ids: set[int], optim: dict, total_steps: int):
    """(AdamW, LambdaLR, the Schedule it follows)."""
    o = check_optim(optim)
    lr, wd = float(o.get("lr", 1e-4)), float(o.get("weight_decay", 0.0))
    scale = float(o.get("vision_lr_scale", 1.0))  # a warmed-up tower is easily wrecked
    groups = []
    for is_vision in (False, True):
        for decay in (True, False):
            ps = [p for p in params if (id(p) in vision_ids) == is_vision and (p.ndim >= 2) == decay]
            if ps:
                groups.append(
                    {"params": ps, "weight_decay": wd if decay else 0.0, "lr": lr * (scale if is_vision else 1.0)}
                )
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(o.get("betas", (0.9, 0.999))))
    schedule = schedule_for(o, total_steps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule.factor), schedule
