"""GRPO: group-relative policy optimisation (Shao et al. 2024), with the Dr. GRPO and DAPO variants.

One training step = one batch of P prompts:

1. rollout      G completions per prompt from one ``generate`` call (KV cache);
2. rewards      the composite reward (``conf/reward``) scores each completion;
3. advantages   reward minus its group's mean (divided by the group's std unless ``dr_grpo``);
4. loss         clipped surrogate + beta * k3 KL to the reference, aggregated by ``loss_type``,
                for ``num_iterations`` passes over ``num_minibatches`` minibatches (one optimiser
                step each; the "old" policy is the one that sampled).

Definitions match TRL's ``GRPOTrainer`` (see :mod:`unveil.stages.losses`).
"""

from __future__ import annotations

import torch

from unveil.stages.losses import LOSS_TYPES, group_advantages, group_has_spread, grpo_loss
from unveil.stages.rl import RLStageModule, mean_metrics
from unveil.stages.rollout import completion_logprobs


class GRPOModule(RLStageModule):
    def __init__(
        self,
        backbone,
        rewards,
        optim: dict | None = None,
        beta: float = 0.04,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        loss_type: str = "grpo",
        scale_rewards: str | None = None,
        num_iterations: int = 1,
        filter_zero_spread: bool = False,
        **kw,
    ):
        super().__init__(backbone, rewards, optim, **kw)
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"stage.loss_type={loss_type!r}; expected one of {LOSS_TYPES}")
        self.beta = float(beta)
        self.loss_type = loss_type
        self.epsilon_low = float(epsilon)
        # DAPO's clip-higher: a wider upper bound keeps exploring low-probability tokens.
        self.epsilon_high = float(epsilon_high) if epsilon_high is not None else (0.28 if loss_type == "dapo" else self.epsilon_low)
        # Dr. GRPO removes the std scaling (it biases towards groups with small spread).
        self.scale_rewards = scale_rewards or ("none" if loss_type == "dr_grpo" else "group")
        self.num_iterations = max(1, int(num_iterations))
        # DAPO's dynamic-sampling filter, without the refill: a group whose completions all scored
        # the same has advantage 0 everywhere, so it only dilutes the loss and costs forward passes.
        self.filter_zero_spread = bool(filter_zero_spread)

    @property
    def needs_reference(self) -> bool:
        return self.beta != 0.0

    def logprobs(self, model, ro, **kw):
        return completion_logprobs(model, ro, self.temperature, chunk_size=self.forward_batch_size, **kw)

    def training_step(self, batch, batch_idx):
        # 1. rollout: G completions per prompt
        ro, reward = self.rollout(batch)

        # 2-3. rewards -> group-relative advantages
        advantages = group_advantages(ro.extra["reward"], ro.group, self.scale_rewards)
        ro.extra["advantages"] = advantages
        self.maybe_log_completions(ro, reward, advantages)
        full = ro
        if self.filter_zero_spread:
            keep = torch.nonzero(group_has_spread(ro.extra["reward"], ro.group)).flatten()
            if keep.numel() == 0:  # nothing to learn from this batch: no update, but log the rollout
                self.log_step(full, reward, {"kept_frac": 0.0, "advantage_abs": 0.0})
                return
            ro = ro.select(keep.cpu())

        # log-probs of the sampling policy and of the reference (no grad). With one pass over the
        # rollouts the old policy is the current one: its log-probs are the detached current ones.
        with torch.no_grad():
            if self.num_iterations > 1 or self.num_minibatches > 1:
                ro.extra["old_logps"] = self.logprobs(self.model, ro).logps
            if self.reference is not None:
                ro.extra["ref_logps"] = self.reference.logprobs(ro, self.temperature, self.forward_batch_size)

        # 4. clipped surrogate + KL, num_iterations passes x minibatches, one optimiser step each
        history: list[dict] = []
        for _ in range(self.num_iterations):
            for idx in self.minibatches(len(ro)):
                mb = ro.select(idx)
                lp = self.logprobs(self.model, mb, with_entropy=True)
                old = mb.extra.get("old_logps", lp.logps.detach())
                loss, m = grpo_loss(
                    lp.logps, old, mb.extra["advantages"], mb.completion_mask, ref_logps=mb.extra.get("ref_logps"),
                    beta=self.beta, eps_low=self.epsilon_low, eps_high=self.epsilon_high, loss_type=self.loss_type,
                    max_completion_length=self.max_new_tokens, entropy=lp.entropy,
                )
                m["grad_norm"] = self.update(loss)
                m["loss"] = loss.detach()
                history.append(m)

        metrics = mean_metrics(history)
        metrics["advantage_abs"] = float(advantages.abs().mean())
        if self.filter_zero_spread:
            metrics["kept_frac"] = len(ro) / len(full)
        self.log_step(full, reward, metrics)
