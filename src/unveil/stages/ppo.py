"""PPO actor-critic, as UMed-LVLM's abnormal-aware rewarding stage (docs/methods.md#umed-lvlm).

One training step = one batch of P prompts:

1. rollout      G completions per prompt from one ``generate`` call (KV cache);
2. rewards      the composite reward scores each completion; with ``score_baseline: group`` the
                mean score of the prompt's G completions is subtracted first (a per-prompt
                baseline, as in RLOO / GRPO); the score is paid on its last token and every token
                pays ``kl_coef * (logp - ref)`` (KL penalty in the reward);
3. advantages   values from the value head, then GAE(gamma, lam) per token (``lam = 1``: Monte
                Carlo returns), whitened over the batch;
4. loss         clipped surrogate + ``vf_coef`` * clipped value loss - ``ent_coef`` * entropy, for
                ``ppo_epochs`` passes over ``num_minibatches`` minibatches (one optimiser step each).

The value head is a linear layer on the LM's final hidden state (the LM head's input), sharing
the trunk with the policy. It is a submodule of this stage, so Lightning checkpoints hold it;
``<run dir>/value_head.pt`` is written at the end of fit as well.

Why the per-prompt baseline (default ``group``): the composite's total has offsets that depend on
the prompt, not on the answer. A head that does not apply counts 0 (vision relevance on a normal
study, localisation and vision relevance on a closed question), and a max-normalised head gives
its best answer 1 whatever its raw quality. With the UMed heads a perfect "No abnormality detected"
on a normal study scores 2, a mediocre box on an abnormal study about 2.7 and a closed answer 1.
The critic starts at V = 0 and cannot learn these offsets within a short run, so the batch-whitened
advantages paid every token of abnormal-study answers (the opening "Abnormality detected" included)
and charged every "No abnormality" answer: PPO learnt to call every study abnormal. Subtracting
the group mean removes any per-prompt offset; only differences between answers to the same prompt
remain, which is what the heads (and their per-query max-normalisation) are meant to rank.
"""

from __future__ import annotations

from pathlib import Path

import torch

from unveil.stages.losses import gae, group_advantages, masked_mean, masked_whiten, ppo_loss, ppo_token_rewards
from unveil.stages.rl import RLStageModule, mean_metrics


def lm_hidden_size(model) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return int(base.get_output_embeddings().in_features)


class ValueHead(torch.nn.Module):
    """``V(s_t) = w . h_t + b`` on the LM's final hidden state; zero-initialised (V = 0 at the start)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


class PPOModule(RLStageModule):
    def __init__(
        self,
        backbone,
        rewards,
        optim: dict | None = None,
        kl_coef: float = 0.05,
        clip_eps: float = 0.2,
        value_clip: float | None = 0.2,
        vf_coef: float = 0.1,
        ent_coef: float = 0.0,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        ppo_epochs: int = 2,
        score_baseline: str = "group",
        **kw,
    ):
        super().__init__(backbone, rewards, optim, **kw)
        self.kl_coef, self.clip_eps, self.value_clip = float(kl_coef), float(clip_eps), value_clip
        self.vf_coef, self.ent_coef = float(vf_coef), float(ent_coef)
        self.gamma, self.lam = float(gamma), float(lam)
        self.whiten_advantages = bool(whiten_advantages)
        self.ppo_epochs = max(1, int(ppo_epochs))
        if score_baseline not in ("group", "none"):
            raise ValueError(f"stage.score_baseline={score_baseline!r}; expected group or none")
        self.score_baseline = score_baseline
        self.value_head = ValueHead(lm_hidden_size(self.model))

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef != 0.0

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return super().trainable_parameters() + list(self.value_head.parameters())

    def policy_and_values(self, ro, with_entropy: bool = False):
        # the entropy carries a graph only when the loss uses it
        lp = self.logprobs(
            self.model, ro, with_entropy=with_entropy, entropy_grad=self.ent_coef != 0, with_hidden=True
        )
        return lp, self.value_head(lp.hidden) * ro.completion_mask

    def training_step(self, batch, batch_idx):
        # 1. rollout: G completions per prompt
        ro, reward = self.rollout(batch)
        mask = ro.completion_mask

        # 2. per-token rewards: the score (minus its prompt's mean) on the last token, the KL penalty on every token
        scores = ro.extra["reward"]
        if self.score_baseline == "group":
            scores = group_advantages(scores, ro.group, "none")
        with torch.no_grad():
            old, old_values = self.policy_and_values(ro)
            ref = self.reference_logprobs(ro) if self.reference else None
            token_rewards, kl = ppo_token_rewards(scores, old.logps, ref, mask, self.kl_coef)

            # 3. advantages and returns (GAE), whitened advantages
            advantages, returns = gae(token_rewards, old_values, mask, self.gamma, self.lam)
            if self.whiten_advantages:
                advantages = masked_whiten(advantages, mask)
        ro.extra.update(old_logps=old.logps, old_values=old_values, advantages=advantages, returns=returns)
        is_metrics = self.importance_weights(ro, old.logps)  # a sampler other than the policy (vLLM)
        self.maybe_log_completions(ro, reward, masked_mean(advantages, mask, dim=1))

        # 4. clipped surrogate + value loss - entropy bonus, ppo_epochs x minibatches
        history: list[dict] = []
        for _ in range(self.ppo_epochs):
            for idx in self.minibatches(len(ro)):

                def loss_fn(part):
                    lp, values = self.policy_and_values(part, with_entropy=True)
                    return ppo_loss(
                        lp.logps,
                        part.extra["old_logps"],
                        part.extra["advantages"],
                        part.completion_mask,
                        values,
                        part.extra["old_values"],
                        part.extra["returns"],
                        entropy=lp.entropy,
                        clip_eps=self.clip_eps,
                        value_clip=self.value_clip,
                        vf_coef=self.vf_coef,
                        ent_coef=self.ent_coef,
                        is_ratio=part.extra.get("is_ratio"),
                    )

                history.append(self.update(ro.select(idx), loss_fn, "tokens"))  # every term is a token mean

        metrics = mean_metrics(history)
        metrics.update(is_metrics)
        metrics["kl"] = float(masked_mean(kl, mask))  # per-token k1 of the sampling policy to the reference
        metrics["value_mean"] = float(masked_mean(old_values, mask))
        metrics["return_mean"] = float(masked_mean(returns, mask))
        self.log_step(ro, reward, metrics)

    def on_fit_end(self) -> None:
        super().on_fit_end()
        if self.trainer.is_global_zero and self.trainer.default_root_dir:
            out = Path(self.trainer.default_root_dir)
            out.mkdir(parents=True, exist_ok=True)
            torch.save(self.value_head.state_dict(), out / "value_head.pt")
