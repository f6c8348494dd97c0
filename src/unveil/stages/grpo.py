"""GRPO: group-relative policy optimisation (Shao et al. 2024), with TRL's loss types (``grpo``,
``bnpo``, ``dr_grpo``, ``dapo``: Dr. GRPO and DAPO's token-level loss).

One training step = one batch of P prompts:

1. rollout      G completions per prompt from one ``generate`` call (KV cache);
2. rewards      the composite reward (``conf/reward``) scores each completion;
3. advantages   reward minus its group's mean (divided by the group's std unless ``dr_grpo``);
4. loss         clipped surrogate + beta * k3 KL to the reference, aggregated by ``loss_type``,
                for ``num_iterations`` passes over ``num_minibatches`` minibatches (one optimiser
                step each; the "old" policy is the one that sampled).

Definitions match TRL's ``GRPOTrainer`` (see :mod:`unveil.stages.losses`). Between 3 and 4,
``filter_zero_spread`` drops groups whose rewards are all equal, and ``fill_batch`` refills the
batch with groups from further rollouts: DAPO's dynamic sampling. DAPO's overlong-reward shaping
is a reward head (``reward=[<preset>,overlong]``, :mod:`unveil.rewards.overlong`).
"""

from __future__ import annotations

import torch

from unveil.stages.losses import LOSS_SCALE, LOSS_TYPES, group_advantages, group_has_spread, grpo_loss
from unveil.stages.rl import RLStageModule, mean_metrics
from unveil.stages.rollout import Rollout, concat_rollouts
from unveil.utils.dist import all_gather_objects, all_reduce_sum, world_size


def held_for_rank(held_by_rank: list[list], rank: int, world: int) -> list:
    """The saved groups this rank resumes with. Saved rank r's go to rank r % world, so a run
    resumed on fewer processes loses none (the refill drops what exceeds a batch, as it always does)."""
    return [s for r, states in enumerate(held_by_rank) if r % world == rank for s in states]


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
        fill_batch: bool = False,
        max_fill_batches: int = 3,
        **kw,
    ):
        super().__init__(backbone, rewards, optim, **kw)
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"stage.loss_type={loss_type!r}; expected one of {', '.join(LOSS_TYPES)} (TRL's names)")
        self.beta = float(beta)
        self.loss_type = loss_type
        self.epsilon_low = float(epsilon)
        # DAPO's clip-higher: a wider upper bound keeps exploring low-probability tokens (TRL leaves
        # epsilon_high = epsilon for every loss type: set stage.epsilon_high to run as TRL does).
        self.epsilon_high = (
            float(epsilon_high) if epsilon_high is not None else (0.28 if loss_type == "dapo" else self.epsilon_low)
        )
        # Dr. GRPO removes the std scaling (it biases towards groups with small spread).
        self.scale_rewards = scale_rewards or ("none" if loss_type == "dr_grpo" else "group")
        self.num_iterations = max(1, int(num_iterations))
        # DAPO's dynamic-sampling filter, without the refill: a group whose completions all scored
        # the same has advantage 0 everywhere, so it only dilutes the loss and costs forward passes.
        self.filter_zero_spread = bool(filter_zero_spread or fill_batch)
        # ... and with the refill: kept groups are held over further rollout batches until there are
        # as many as a batch has prompts (at most max_fill_batches batches), then one update on them.
        self.fill_batch = bool(fill_batch)
        self.max_fill_batches = max(1, int(max_fill_batches))
        self._pending: list = []
        self._pending_batches = 0
        self._kept_frac, self._fill_batches = 1.0, 1

    @property
    def needs_reference(self) -> bool:
        return self.beta != 0.0

    def _all_ranks(self, decision: bool) -> bool:
        """True only if every process agrees (under DDP all ranks must step together)."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None or trainer.world_size <= 1:
            return decision
        return bool(trainer.strategy.reduce_boolean_decision(decision, all=True))

    def groups_with_spread(self, ro, n_prompts: int):
        """The completions to update on, from the groups with reward spread; None = no update yet.

        Under DDP every rank updates at the same steps: a rank with nothing kept then updates on
        its whole rollout, whose zero advantages leave only the KL term."""
        keep = torch.nonzero(group_has_spread(ro.extra["reward"], ro.group)).flatten().cpu()
        self._kept_frac = keep.numel() / max(1, len(ro))
        kept = ro.select(keep) if keep.numel() else None
        if not self.fill_batch:
            self._fill_batches = 1
            if not self._all_ranks(kept is None):
                return kept if kept is not None else ro
            return None
        if kept is not None:
            self._pending.append(kept)
        self._pending_batches += 1
        held = sum(int(torch.unique(p.group).numel()) for p in self._pending)
        # every rank counts the same rollout batches, so max_fill_batches is reached together
        if self._pending_batches < self.max_fill_batches and not self._all_ranks(held >= n_prompts):
            return None
        pending, self._fill_batches = self._pending, self._pending_batches
        self._pending, self._pending_batches = [], 0
        if self._all_ranks(not pending):
            return None
        if not pending:
            return ro
        merged = concat_rollouts(pending, self.backbone.tokenizer.pad_token_id)
        first = torch.unique(merged.group)[:n_prompts]  # as DAPO: exactly a batch of groups, the rest dropped
        return merged.select(torch.nonzero(torch.isin(merged.group, first)).flatten().cpu())

    # The groups held for the refill are part of the run's state: a run resumed from a checkpoint
    # taken mid-refill goes on with them, as if it had not stopped. Under DDP each rank holds its
    # own groups and only rank 0 writes the file, so the file gathers every rank's.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.fill_batch:
            held_by_rank = all_gather_objects([p.state() for p in self._pending])  # every rank saves
            checkpoint["grpo_fill_batch"] = {"batches": self._pending_batches, "held_by_rank": held_by_rank}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        held = checkpoint.get("grpo_fill_batch")
        if held is None:
            return
        trainer = getattr(self, "_trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        by_rank = held["held_by_rank"] if "held_by_rank" in held else [held["held"]]  # older files: rank 0's only
        self._pending_batches = int(held["batches"])  # every rank counts the same batches
        self._pending = [Rollout.from_state(s) for s in held_for_rank(by_rank, rank, world)]

    def on_train_start(self) -> None:
        super().on_train_start()
        # restored groups come back on the CPU; by now the module is on its device
        self._pending = [p.to(self.device) for p in self._pending]

    def training_step(self, batch, batch_idx):
        # 1. rollout: G completions per prompt
        ro, reward = self.rollout(batch)

        # 2-3. rewards -> group-relative advantages
        advantages = group_advantages(ro.extra["reward"], ro.group, self.scale_rewards)
        ro.extra["advantages"] = advantages
        self.maybe_log_completions(ro, reward, advantages)
        full = ro
        if self.filter_zero_spread:
            ro = self.groups_with_spread(ro, n_prompts=len(batch["samples"]))
            if ro is None:  # no group with spread (or still filling the batch): no update, but log the rollout
                self.log_step(full, reward, {"kept_frac": self._kept_frac})
                return

        # log-probs of the sampling policy and of the reference (no grad). With one pass over the
        # rollouts the old policy is the current one: its log-probs are the detached current ones.
        # A sampler other than the policy (vLLM) needs them too, for the IS correction (as TRL).
        is_metrics: dict[str, float] = {}
        with torch.no_grad():
            if self.num_iterations > 1 or self.num_minibatches > 1 or "sampler_logps" in ro.extra:
                ro.extra["old_logps"] = self.logprobs(self.model, ro).logps
                is_metrics = self.importance_weights(ro, ro.extra["old_logps"])
            if self.reference is not None:
                ro.extra["ref_logps"] = self.reference_logprobs(ro)

        # dapo normalises by the completion tokens of the whole rollout batch, summed over processes
        num_items = all_reduce_sum(ro.completion_mask.sum().float()) if self.loss_type == "dapo" else None

        # 4. clipped surrogate + KL, num_iterations passes x minibatches, one optimiser step each
        history: list[dict] = []
        # the objective's settings; dapo's normaliser also needs the rollout batch's token count
        objective = dict(beta=self.beta, eps_low=self.epsilon_low, eps_high=self.epsilon_high)
        objective.update(loss_type=self.loss_type, max_completion_length=self.max_new_tokens)
        objective.update(num_items_in_batch=num_items, num_processes=world_size())
        for _ in range(self.num_iterations):
            parts = self.minibatches(len(ro))
            for idx in parts:

                def loss_fn(part):
                    lp = self.logprobs(self.model, part, with_entropy=True)
                    old = part.extra.get("old_logps", lp.logps.detach())
                    return grpo_loss(
                        lp.logps,
                        old,
                        part.extra["advantages"],
                        part.completion_mask,
                        ref_logps=part.extra.get("ref_logps"),
                        entropy=lp.entropy,
                        steps_per_generation=len(parts),  # noqa: B023  (called at once, in this iteration)
                        is_ratio=part.extra.get("is_ratio"),
                        **objective,
                    )

                history.append(self.update(ro.select(idx), loss_fn, LOSS_SCALE[self.loss_type]))

        metrics = mean_metrics(history)
        metrics.update(is_metrics)
        metrics["advantage_abs"] = float(advantages.abs().mean())
        if self.filter_zero_spread:
            metrics["kept_frac"] = self._kept_frac
            metrics["fill_batches"] = self._fill_batches
        self.log_step(full, reward, metrics)
