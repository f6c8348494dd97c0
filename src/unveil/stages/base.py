"""What every stage module shares: the backbone, the optimiser and schedule, and logging."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch

from unveil.stages.optim import Schedule, build_optimizer, check_optim
from unveil.utils.dist import all_gather_objects
from unveil.utils.fsdp import clip_grad_norm, fsdp_root
from unveil.utils.rng import rng_state, set_rng_state

log = logging.getLogger(__name__)

HALF = (torch.bfloat16, torch.float16)


class StageModule(pl.LightningModule):
    """Base LightningModule: holds ``self.model`` (so checkpoints store ``model.*`` weights).

    Two things every stage gets from here, for models at real scale:

    - fp32 master weights (``optim.master_weights: fp32``): under a mixed precision
      (``trainer.precision: bf16-mixed``) the trainable weights of a model loaded in bf16/fp16 are
      upcast to fp32 before the optimiser is built and before a checkpoint is restored, so AdamW
      updates (and its state) are fp32 and an update of 1e-6 is not rounded away; the forward
      still computes in bf16 under autocast. Frozen weights, and a reference model copied at
      setup, stay in the dtype they were loaded in. When fit ends the upcast weights go back to
      that dtype (the saved ``backbone/`` and the evaluation see the model as it was loaded);
      checkpoints hold the fp32 master weights.
    - adapter-only checkpoints under peft: the frozen base is left out of the checkpoint (the
      adapters, ``modules_to_save``, buffers, heads outside ``self.model`` such as PPO's value head,
      the optimiser and the training state stay). A resume rebuilds the base from the config and
      checks it against a fingerprint of the base the run trained on.
    """

    # whether the stage scores its own samples with the `reward` group's heads (RL stages): train.py
    # builds the heads and passes them as ``rewards``
    needs_rewards = False

    def __init__(self, backbone, optim: dict | None = None):
        super().__init__()
        self.backbone = backbone
        self.model = backbone.model  # registered as a submodule: checkpoints, .to(device), train()
        self.optim = check_optim(optim)
        self.schedule: Schedule | None = None  # set with the optimiser
        self.master_weights = str(self.optim.get("master_weights", "fp32")).lower()
        if self.master_weights not in ("fp32", "none"):
            raise ValueError(f"optim.master_weights={self.master_weights!r}; expected fp32 or none")
        self._upcast: list[tuple[torch.nn.Parameter, torch.dtype]] = []  # what fit end casts back
        self._frozen_fingerprint: dict | None = None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimiser updates; stages with extra heads (PPO's value head) add theirs."""
        return [p for p in self.model.parameters() if p.requires_grad]

    # --- fp32 master weights --------------------------------------------------------------------
    def configure_model(self) -> None:
        # Lightning calls this after setup (where RL stages copy their reference) and before it
        # restores a checkpoint and builds the optimiser: restored fp32 weights are not rounded.
        if self.trainer.state.fn != "fit" or self._upcast:
            return
        half = [p for p in self.trainable_parameters() if p.dtype in HALF]
        if not half:
            return
        precision = str(self.trainer.precision)
        n = sum(p.numel() for p in half)
        if self.master_weights == "none":
            log.info("optim.master_weights=none: %d trainable weights are updated in %s", n, half[0].dtype)
        elif not precision.endswith("-mixed"):
            # Under 32-true fp32 trainable layers next to frozen bf16 ones would fail in the forward
            # (no autocast to meet in); under *-true Lightning casts the whole model anyway.
            log.warning(
                "%d trainable weights are %s and trainer.precision=%s: AdamW updates them in %s, where "
                "updates much smaller than the weights (lr 1e-6) round to zero. trainer.precision=bf16-mixed "
                "keeps fp32 master weights (or load the model in fp32: model.dtype=float32)",
                n,
                half[0].dtype,
                precision,
                half[0].dtype,
            )
        else:
            for p in half:
                self._upcast.append((p, p.dtype))
                p.data = p.data.float()
            log.info(
                "fp32 master weights: %d trainable tensors (%d weights) upcast from %s; frozen weights stay, "
                "the forward runs under %s autocast",
                len(half),
                n,
                half[0].dtype,
                precision,
            )

    def teardown(self, stage: str) -> None:
        # after fit (and its last checkpoint): the model goes back to the dtype it was loaded in,
        # so the saved backbone and the evaluation see one dtype, as without master weights
        for p, dtype in self._upcast:
            p.data = p.data.to(dtype)
        self._upcast = []

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's FSDP precision refuses clip-by-norm (a shard's norm is not the global one):
        # FSDP's own clip_grad_norm_ all-reduces it
        if gradient_clip_val and fsdp_root(self.trainer) is not None and gradient_clip_algorithm in (None, "norm"):
            clip_grad_norm(self.trainer, self.trainable_parameters(), gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise ValueError("no trainable parameters: check model.freeze and peft settings")
        tower = getattr(getattr(self.backbone.base_model, "model", None), "vision_tower", None)
        vision_ids = {id(p) for p in tower.parameters()} if tower is not None else set()
        opt, sched, self.schedule = build_optimizer(
            params, vision_ids, self.optim, self.trainer.estimated_stepping_batches
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- adapter-only checkpoints under peft -------------------------------------------------------
    def _frozen_keys(self) -> list[str]:
        """State-dict keys of the model's frozen parameters (every name of a shared one)."""
        return [
            n
            for n, p in self.named_parameters(remove_duplicate=False)
            if n.startswith("model.") and not p.requires_grad
        ]

    def frozen_fingerprint(self) -> dict:
        """``keys``: the frozen parameters; ``stats``: per key [numel, sum, sum of squares] in float64
        (chunked: no fp64 copy of a whole embedding). Enough to tell a rebuilt base from another one,
        and cheap next to writing a checkpoint."""
        params = dict(self.named_parameters(remove_duplicate=False))
        keys = self._frozen_keys()
        stats = torch.zeros(len(keys), 3, dtype=torch.float64)
        with torch.no_grad():
            for i, k in enumerate(keys):
                for c in params[k].detach().reshape(-1).split(1 << 24):
                    c = c.double()
                    stats[i] += torch.stack([c.new_tensor(c.numel()), c.sum(), c.dot(c)]).cpu()
        return {"keys": keys, "stats": stats}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # hyper_parameters would pickle config objects: without them torch.load(weights_only=True)
        # reads the file
        checkpoint.pop("hyper_parameters", None)
        if hasattr(self.model, "peft_config"):
            # LoRA: the frozen base (~17 GB for a 7B model) is rebuilt from the config on resume;
            # buffers stay (a frozen tower in train mode still moves its batch-norm statistics)
            if self._frozen_fingerprint is None:  # frozen weights do not change: computed once
                self._frozen_fingerprint = self.frozen_fingerprint()
            sd = checkpoint["state_dict"]
            for k in self._frozen_fingerprint["keys"]:
                sd.pop(k, None)
            checkpoint["frozen_weights"] = self._frozen_fingerprint
        # The random streams, every rank's (RL sampling, dropout), so that a resumed run draws what
        # the uninterrupted one would. Every rank dumps the checkpoint; rank 0 writes it.
        checkpoint["rng_by_rank"] = all_gather_objects(rng_state())
        if self.schedule is not None:  # what a resume compares its own schedule with
            checkpoint["lr_schedule"] = dataclasses.asdict(self.schedule)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resume_rng = checkpoint.get("rng_by_rank")
        self._resume_schedule = checkpoint.get("lr_schedule")
        saved = checkpoint.get("frozen_weights")
        if saved is not None:  # an adapter-only checkpoint: the base is the one built now
            self._check_frozen_base(saved)
            # the frozen weights load onto themselves, so a strict load still fails on a missing
            # or unexpected trainable key
            sd, mine = checkpoint["state_dict"], self.state_dict()
            for k in saved["keys"]:
                sd.setdefault(k, mine[k])

    def _check_frozen_base(self, saved: dict) -> None:
        now = self.frozen_fingerprint()
        if now["keys"] != list(saved["keys"]):
            missing, extra = (
                sorted(set(saved["keys"]) - set(now["keys"])),
                sorted(set(now["keys"]) - set(saved["keys"])),
            )
            raise RuntimeError(
                "adapter-only checkpoint: this model's frozen parameters are not those the checkpoint "
                f"was trained with (not here: {missing[:3]}, not in the checkpoint: {extra[:3]}); "
                "check model.* and peft.* against the run's .hydra/config.yaml"
            )
        a, b = saved["stats"], now["stats"]
        n, ss = a[:, 0], a[:, 2]
        # the same weights summed in another order (another device) differ by far less than this
        same = (n == b[:, 0]) & ((a[:, 1] - b[:, 1]).abs() <= 1e-6 * (n * ss).sqrt() + 1e-12)
        same &= (ss - b[:, 2]).abs() <= 1e-6 * ss + 1e-12
        if not same.all():
            differ = [k for k, ok in zip(saved["keys"], same.tolist()) if not ok]
            raise RuntimeError(
                f"adapter-only checkpoint: {len(differ)} of {len(same)} frozen weights of the model built now "
                f"differ from the base the checkpoint was trained on (e.g. {differ[:3]}). Under peft a "
                "checkpoint holds the adapters only and a resume rebuilds the base from the config: resume "
                "with the same model (model.name_or_path, model.init_from, init_seed); a base changed "
                "before training (a model built in code and warmed up by model.vision_pretrain, which a "
                "resume skips) cannot be rebuilt: start such runs from model.init_from=<run dir>"
            )

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
        saved, self._resume_schedule = getattr(self, "_resume_schedule", None), None
        if saved is not None and self.schedule is not None and Schedule(**saved) != self.schedule:
            log.warning(
                "resumed with another learning-rate schedule than the run was started with (%s, now %s): "
                "from here on the learning rate follows the new one (trainer.max_steps or stage.optim changed?)",
                saved,
                dataclasses.asdict(self.schedule),
            )
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

    # --- one optimiser step over micro-batches (manual optimisation: the RL stages and DPO) -------------
    def accumulate_step(self, parts: list[tuple[Any, float, float]], loss_fn: Callable[[Any], tuple]) -> dict:
        """zero_grad; for each ``(part, weight, share)``: ``backward(weight * loss_fn(part)[0])``;
        then clip (``max_grad_norm``), step, schedule. The weights make the summed gradient that of
        the whole batch (each part's share of the mean the loss takes); under DDP the gradients are
        all-reduced once, after the last part. Returns the parts' metrics merged by ``share``
        (:func:`merge_micro_metrics`), ``loss`` (the whole batch's), ``grad_norm`` (pre-clip) and
        ``outputs`` (each part's ``loss_fn`` result)."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        opt.zero_grad(set_to_none=True)
        total, history, outputs = 0.0, [], []
        for k, (part, weight, share) in enumerate(parts):
            out = loss_fn(part)
            loss, metrics = out[0], out[1]
            last = k == len(parts) - 1
            with contextlib.nullcontext() if last else _no_backward_sync(self.trainer.strategy):
                self.manual_backward(loss * weight)
            total += float(loss.detach()) * weight
            history.append((share, metrics))
            outputs.append(out)
        norm = None
        clip = getattr(self, "max_grad_norm", None)
        if clip:
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            norm = float(clip_grad_norm(self.trainer, params, clip))  # global norm, FSDP shards included
        opt.step()
        if sched is not None:
            sched.step()
        return {**merge_micro_metrics(history), "loss": total, "grad_norm": norm, "outputs": outputs}


def merge_micro_metrics(history: list[tuple[float, dict]]) -> dict[str, float]:
    """One batch's metrics from its micro-batches' ``(share, metrics)``: share-weighted means,
    except ``*_min`` and ``*_max`` (the min / max over the parts)."""
    out: dict[str, float] = {}
    for key in {k for _, m in history for k, v in m.items() if v is not None}:
        vals = [(w, float(m[key])) for w, m in history if m.get(key) is not None]
        if key.endswith("_min") or key.endswith("_max"):
            out[key] = (min if key.endswith("_min") else max)(v for _, v in vals)
        else:
            out[key] = sum(w * v for w, v in vals) / max(sum(w for w, _ in vals), 1e-12)
    return out


def _no_backward_sync(strategy):
    """DDP's no_sync for all but the last micro-batch (a plain context on one process)."""
    block = getattr(strategy, "block_backward_sync", None)
    return block() if block is not None else contextlib.nullcontext()
