"""What GRPO and PPO share: rollouts, rewards, the reference policy, the optimiser step,
logging (per-step metrics, a completions table) and validation.

The subclasses' ``training_step`` reads top to bottom: rollout -> rewards -> advantages -> loss.
Both use Lightning's manual optimisation, because one rollout batch feeds several optimiser
steps (``num_iterations`` / ``ppo_epochs`` x ``num_minibatches``); ``trainer.max_steps`` therefore
counts optimiser steps, as in TRL. Gradient clipping is done here (``max_grad_norm``, by default
``trainer.gradient_clip_val``), since Lightning does not clip under manual optimisation.

Metrics carry TRL's names (``GRPOTrainer``), under ``train/`` or ``val/``: per rollout batch
``rewards/<head>/mean`` and ``/std`` (plus ``/frac_zero_std``, ``/applicable_frac``), ``reward``,
``reward_std``, ``frac_reward_zero_std`` (groups whose completions all scored the same),
``completions/mean_length``, ``/min_length``, ``/max_length``, ``/clipped_ratio`` (no EOS within
``max_new_tokens``), ``/mean_terminated_length``, ``/min_terminated_length``,
``/max_terminated_length``; from the loss (:mod:`unveil.stages.losses`) ``kl``, ``entropy``,
``clip_ratio/low_mean``, ``/high_mean``, ``/region_mean``, ``/low_min``, ``/high_max``; and
``loss``, ``grad_norm``. What TRL has no name for keeps its own: ``approx_kl``, ``ratio``, the
stages' extras, and where a step's time went: ``time/generate_s``, ``time/reward_s``,
``time/update_s`` (the rest: log-probs, reference, optimiser steps) and ``time/step_s``.

Validation samples ``val_num_generations`` completions per validation prompt, scores them with
the same composite reward and logs the rollout metrics under ``val/``; ``val/loss`` is
``-val/reward`` so that the default checkpoint callback (min ``val/loss``) keeps the
best-rewarded policy.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from unveil.data.collate import PromptCollator
from unveil.models.policy import ReferencePolicy, row_chunks
from unveil.models.policy import disable_dropout as _disable_dropout
from unveil.rewards.base import RewardOutput
from unveil.rewards.composite import zero_spread_fraction
from unveil.stages.base import StageModule
from unveil.stages.guard import non_finite_sampling
from unveil.stages.losses import truncated_is_ratio
from unveil.stages.rollout import Rollout, sample_rollouts
from unveil.utils.fsdp import full_params

log = logging.getLogger(__name__)


def mean_metrics(history: list[dict]) -> dict[str, float]:
    """Average each metric over the optimiser steps of one rollout batch (None and NaN entries skipped)."""
    vals: dict[str, list[float]] = {}
    for h in history:
        for k, v in h.items():
            if v is not None and math.isfinite(float(v)):
                vals.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in sorted(vals.items())}


def _engine(rollout):
    """``stage.rollout`` as built by Hydra: an engine, or None; a bare name is a selection mistake."""
    if rollout is not None and not hasattr(rollout, "sample"):
        # `stage.rollout=vllm` sets the string; the engine's yaml is picked with the group's package syntax
        raise ValueError(
            f"stage.rollout={rollout!r} is not a rollout engine: select one of conf/rollout with "
            f"+rollout@stage.rollout={rollout} (or give stage.rollout a _target_)"
        )
    return rollout


class RLStageModule(StageModule):
    needs_rewards = True

    def __init__(
        self,
        backbone,
        rewards: Callable[[Any], RewardOutput],
        optim: dict | None = None,
        num_generations: int = 4,
        max_new_tokens: int = 48,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        num_minibatches: int = 1,
        max_grad_norm: float | None = 1.0,
        forward_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        share_prompt: bool = True,
        disable_dropout: bool = True,
        log_completions_every: int = 50,
        log_completions_prompts: int = 2,
        val_num_generations: int | None = None,
        vocab: list[str] | None = None,
        rollout=None,
        vllm_importance_sampling_correction: bool = True,
        vllm_importance_sampling_cap: float = 3.0,
    ):
        super().__init__(backbone, optim)
        # what samples the completions (unveil.engines); None = the policy's own generate (HFEngine's path)
        self.engine = _engine(rollout)
        self.is_correction = bool(vllm_importance_sampling_correction)
        self.is_cap = float(vllm_importance_sampling_cap)
        self.automatic_optimization = False
        self.rewards = rewards
        self.num_generations = int(num_generations)
        self.max_new_tokens = int(max_new_tokens)
        self.temperature, self.top_p, self.top_k = float(temperature), float(top_p), int(top_k or 0)
        self.num_minibatches = max(1, int(num_minibatches))
        self.max_grad_norm = float(max_grad_norm) if max_grad_norm else None
        self.forward_batch_size = forward_batch_size
        self.share_prompt = bool(share_prompt)
        self.micro_batch_size = int(micro_batch_size) if micro_batch_size else None
        self.log_completions_every = int(log_completions_every or 0)
        self.log_completions_prompts = int(log_completions_prompts)
        self.val_num_generations = int(val_num_generations or num_generations)
        self.vocab = list(vocab or getattr(rewards, "vocab", None) or [])
        if getattr(rewards, "bind", None) is not None and getattr(rewards, "backbone", None) is None:
            rewards.bind(backbone, self.vocab)  # a composite built without them (tests, notebooks)
        if disable_dropout:
            _disable_dropout(self.model)
        self.collator = PromptCollator(backbone)
        self.reference: ReferencePolicy | None = None
        self._rollout_steps = 0
        self._times: dict[str, float] = {}

    # --- setup --------------------------------------------------------------------------------
    @property
    def needs_reference(self) -> bool:
        return False

    def setup(self, stage: str | None = None) -> None:
        # Taken once, before any update and before a checkpoint restore: the initial policy.
        if self.needs_reference and self.reference is None:
            self.reference = ReferencePolicy(self.model)
            log.info("reference policy: %s", "adapter off (LoRA)" if self.reference.adapter_off else "frozen copy")

    def on_fit_start(self) -> None:
        if self.reference is not None:
            self.reference.to(self.device)

    # --- rollout and rewards --------------------------------------------------------------------
    def rollout(self, batch: dict, num_generations: int | None = None) -> tuple[Rollout, RewardOutput]:
        """G sampled completions per prompt and their rewards (wall times kept for ``log_step``)."""
        t0 = time.perf_counter()
        if self.engine is not None:
            self.engine.sync(self.backbone, int(self.global_step))  # pushes weights only when they changed
        # under FSDP the whole policy is gathered for the sampling (ranks generate different lengths)
        with non_finite_sampling(self.trainer), full_params(self.trainer):
            ro = sample_rollouts(
                self.backbone,
                batch,
                num_generations or self.num_generations,
                self.max_new_tokens,
                self.temperature,
                self.top_p,
                self.top_k,
                share_prompt=self.share_prompt,
                engine=self.engine,
            )
        t1 = time.perf_counter()
        reward = self.rewards(ro)
        ro.extra["reward"] = reward.total.to(self.device).float()
        self._times = {"start": t0, "generate": t1 - t0, "reward": time.perf_counter() - t1}
        return ro, reward

    def logprobs(self, model, ro: Rollout, **kw):
        """The rollout's per-token log-probs under ``model`` (the policy, or the reference's)."""
        return ro.logprobs(model, self.temperature, self.share_prompt, self.forward_batch_size, **kw)

    def importance_weights(self, ro: Rollout, old_logps: torch.Tensor) -> dict[str, float]:
        """Sets ``ro.extra["is_ratio"]``, the truncated IS weight of each token for a sampler that is
        not the policy (:func:`unveil.stages.losses.truncated_is_ratio`), when the rollout carries
        the sampler's log-probs and the correction is on; returns the mismatch metrics (TRL's names)."""
        sampler = ro.extra.get("sampler_logps")
        if not self.is_correction or sampler is None:
            return {}
        ratio, metrics = truncated_is_ratio(old_logps, sampler, ro.completion_mask, self.is_cap)
        ro.extra["is_ratio"] = ratio
        return {k: float(v) for k, v in metrics.items()}

    def on_fit_end(self) -> None:
        super().on_fit_end()
        if self.engine is not None:
            self.engine.close()

    def reference_logprobs(self, ro: Rollout) -> torch.Tensor:
        with self.reference.model() as ref:
            return self.logprobs(ref, ro).logps

    def minibatches(self, n: int) -> list[torch.Tensor]:
        """A random split of the N completions into ``num_minibatches`` parts."""
        perm = torch.randperm(n) if self.num_minibatches > 1 else torch.arange(n)
        return [p for p in perm.chunk(self.num_minibatches) if p.numel()]

    # --- optimisation ---------------------------------------------------------------------------
    def update(self, mb: Rollout, loss_fn: Callable[[Rollout], tuple], weight_by: str = "tokens") -> dict:
        """One optimiser step on the minibatch ``mb``: backward, clip, step, schedule.

        ``loss_fn(part) -> (loss, metrics)`` runs on micro-batches of at most ``micro_batch_size``
        completions (whole groups together; all of ``mb`` when unset) and each backward is scaled
        by the part's share of the minibatch, so the summed gradient is the whole minibatch's:
        ``weight_by`` ``rows`` for a mean over completions, ``tokens`` for a mean over completion
        tokens, ``none`` when the loss's normaliser is already the minibatch's. Returns the
        metrics (token-weighted means; ``*_min`` / ``*_max`` as such), ``loss`` and ``grad_norm``
        (pre-clip)."""
        size = self.micro_batch_size
        parts = [mb] if not size or size >= len(mb) else [mb.select(r) for r in row_chunks(mb.group, len(mb), size)]
        tokens = float(mb.completion_mask.sum().clamp(min=1))
        shares = [float(p.completion_mask.sum()) / tokens for p in parts]
        weights = {"rows": [len(p) / len(mb) for p in parts], "tokens": shares, "none": [1.0] * len(parts)}[weight_by]
        metrics = self.accumulate_step(list(zip(parts, weights, shares)), loss_fn)
        return {k: v for k, v in metrics.items() if k != "outputs"}

    # --- logging --------------------------------------------------------------------------------
    def rollout_metrics(self, ro: Rollout, reward: RewardOutput) -> dict[str, float]:
        """TRL's per-generation-batch metrics of a rollout, unprefixed: the reward stats,
        ``frac_reward_zero_std`` and ``completions/*`` (TRL's ``_generate_and_score_completions``)."""
        out = {k: float(v) for k, v in reward.stats.items() if isinstance(v, float)}
        total = reward.total.float()
        out.setdefault("reward", float(total.mean()) if total.numel() else float("nan"))
        out.setdefault("reward_std", float(total.std()) if total.numel() > 1 else float("nan"))  # as TRL's nanstd
        out["frac_reward_zero_std"] = zero_spread_fraction(ro.extra["reward"], ro.group)  # groups without signal
        lengths = ro.lengths.float()
        eos = self.backbone.tokenizer.eos_token_id
        ended = ((ro.completion_ids == eos) & ro.completion_mask.bool()).any(1)
        terminated = lengths[ended] if bool(ended.any()) else lengths.new_zeros(1)  # TRL: 0 when none ended
        out.update(
            {
                "completions/mean_length": float(lengths.mean()),
                "completions/min_length": float(lengths.min()),
                "completions/max_length": float(lengths.max()),
                "completions/clipped_ratio": float((~ended).float().mean()),  # no EOS within max_new_tokens
                "completions/mean_terminated_length": float(terminated.mean()),
                "completions/min_terminated_length": float(terminated.min()),
                "completions/max_terminated_length": float(terminated.max()),
            }
        )
        return out

    def log_step(self, ro: Rollout, reward: RewardOutput, metrics: dict[str, float], prefix: str = "train") -> None:
        n_prompts = int(ro.group.max()) + 1 if len(ro) else 1
        logs = self.rollout_metrics(ro, reward)
        logs.update({k: float(v) for k, v in metrics.items() if v is not None})
        # where a step's time goes: sampling, reward heads, and the rest (log-probs, reference, updates)
        t = self._times
        if t:
            total_s = time.perf_counter() - t["start"]
            logs.update(
                {
                    "time/generate_s": t["generate"],
                    "time/reward_s": t["reward"],
                    "time/update_s": max(0.0, total_s - t["generate"] - t["reward"]),
                    "time/step_s": total_s,
                }
            )
        bar = {"reward", "loss", "kl"}
        for k, v in logs.items():
            if math.isfinite(v):
                self.log(f"{prefix}/{k}", v, on_step=True, on_epoch=False, prog_bar=k in bar, batch_size=n_prompts)

    def maybe_log_completions(self, ro: Rollout, reward: RewardOutput, advantages: torch.Tensor | None = None) -> None:
        """Every ``log_completions_every`` rollout steps: the completions of the first prompts, with
        their per-head rewards, to ``<run dir>/completions.jsonl`` and a wandb Table if attached."""
        step = self._rollout_steps
        self._rollout_steps += 1
        if not self.log_completions_every or step % self.log_completions_every or not self.trainer.is_global_zero:
            return
        keep = [i for i in range(len(ro)) if int(ro.group[i]) < self.log_completions_prompts]
        heads = list(reward.per_head)
        rows = []
        for i in keep:
            s = ro.samples[i]
            row = {
                "step": int(self.global_step),
                "rollout_step": step,
                "sample_id": s.id,
                "task": s.task,
                "group": int(ro.group[i]),
                "prompt": s.prompt_messages[-1]["content"] if s.prompt_messages else "",
                "completion": ro.texts[i],
                "reference": s.target,
                "reward": float(reward.total[i]),
                "advantage": float(advantages[i].float().mean()) if advantages is not None else None,
            }
            for h in heads:
                v = float(reward.per_head[h][i])
                row[f"rewards/{h}"] = v if math.isfinite(v) else None
            rows.append(row)
        out = Path(self.trainer.default_root_dir or ".")
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "completions.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        try:
            from pytorch_lightning.loggers import WandbLogger
        except ImportError:  # pragma: no cover
            return
        for lg in self.loggers:
            if isinstance(lg, WandbLogger) and rows:
                cols = list(rows[0])
                lg.log_table(
                    key="completions", columns=cols, data=[[r[c] for c in cols] for r in rows], step=self.global_step
                )

    # --- validation -----------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        ro, reward = self.rollout(batch, self.val_num_generations)
        n = len(batch["samples"])
        logs = self.rollout_metrics(ro, reward)
        # Synced: logged by every rank, in the same order, and always finite. The rest (per-head
        # stats are NaN where a head does not apply, so keys differ between batches and ranks) per rank.
        synced = ("reward", "completions/mean_length", "completions/clipped_ratio")
        for k, v in logs.items():
            if k not in synced and math.isfinite(v):
                self.log(f"val/{k}", v, on_epoch=True, batch_size=n)
        total = logs["reward"] if math.isfinite(logs["reward"]) else 0.0
        self.log("val/reward", total, on_epoch=True, batch_size=n, sync_dist=True)
        self.log("val/loss", -total, prog_bar=True, on_epoch=True, batch_size=n, sync_dist=True)
        for k in synced[1:]:
            self.log(f"val/{k}", logs[k], on_epoch=True, batch_size=n, sync_dist=True)
