"""What every stage module shares: the backbone, the optimiser and schedule, and logging."""

from __future__ import annotations

import logging
import math

import pytorch_lightning as pl
import torch

from unveil.utils.dist import all_gather_objects
from unveil.utils.rng import rng_state, set_rng_state

log = logging.getLogger(__name__)


class StageModule(pl.LightningModule):
    """Base LightningModule: holds ``self.model`` (so checkpoints store ``model.*`` weights)."""

    def __init__(self, backbone, optim: dict | None = None):
        super().__init__()
        self.backbone = backbone
        self.model = backbone.model  # registered as a submodule: checkpoints, .to(device), train()
        self.optim = dict(optim or {})

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimiser updates; stages with extra heads (PPO's value head) add theirs."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        o = self.optim
        params = self.trainable_parameters()
        if not params:
            raise ValueError("no trainable parameters: check model.freeze and peft settings")
        lr, wd = float(o.get("lr", 1e-4)), float(o.get("weight_decay", 0.0))
        # The vision tower may want its own learning rate (a warmed-up tower is easily wrecked).
        tower = getattr(getattr(self.backbone.base_model, "model", None), "vision_tower", None)
        vision_ids = {id(p) for p in tower.parameters()} if tower is not None else set()
        scale = float(o.get("vision_lr_scale", 1.0))
        groups = []
        for is_vision in (False, True):
            for decay in (True, False):
                ps = [p for p in params if (id(p) in vision_ids) == is_vision and (p.ndim >= 2) == decay]
                if ps:
                    groups.append(
                        {"params": ps, "weight_decay": wd if decay else 0.0, "lr": lr * (scale if is_vision else 1.0)}
                    )
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(o.get("betas", (0.9, 0.999))))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(o.get("warmup_steps", 0))
        if o.get("warmup_ratio"):
            warmup = int(float(o["warmup_ratio"]) * total)
        min_ratio = float(o.get("min_lr_ratio", 0.0))
        kind = o.get("scheduler", "cosine")

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / max(1, warmup)
            if kind == "constant":
                return 1.0
            t = min(1.0, (step - warmup) / max(1, total - warmup))
            return min_ratio + (1 - min_ratio) * (0.5 * (1 + math.cos(math.pi * t)) if kind == "cosine" else 1 - t)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # hyper_parameters would pickle config objects: without them torch.load(weights_only=True)
        # reads the file
        checkpoint.pop("hyper_parameters", None)
        # The random streams, every rank's (RL sampling, dropout), so that a resumed run draws what
        # the uninterrupted one would. Every rank dumps the checkpoint; rank 0 writes it.
        checkpoint["rng_by_rank"] = all_gather_objects(rng_state())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resume_rng = checkpoint.get("rng_by_rank")

    def on_train_end(self) -> None:
        from unveil.data.datamodule import stop_loader_workers

        # ModelCheckpoint writes last.ckpt at validation only: when max_steps is not a multiple of
        # val_check_interval (umed_sft: 1200 and 650) it would hold an earlier step than the run
        # ended on. Saved here, inside fit, while the loader still has its place to save.
        cb = self.trainer.checkpoint_callback
        if cb is not None and cb.save_last and cb.dirpath:
            self.trainer.save_checkpoint(f"{cb.dirpath}/last.ckpt", weights_only=False)  # all ranks: the hooks gather
        stop_loader_workers(self.trainer.train_dataloader)  # before Lightning drops the iterator

    def on_train_start(self) -> None:
        # Restored here, not at load time: Lightning loads the checkpoint before building the
        # dataloaders and the optimiser, which draw from the same streams in both runs only from now on.
        states, self._resume_rng = getattr(self, "_resume_rng", None), None
        if states:
            rank, world = self.trainer.global_rank, self.trainer.world_size
            if len(states) == world:
                set_rng_state(states[rank])
            else:
                log.warning(
                    "checkpoint has the random state of %d processes, this run has %d: not restored, "
                    "so sampling after the resume differs from the uninterrupted run",
                    len(states),
                    world,
                )
