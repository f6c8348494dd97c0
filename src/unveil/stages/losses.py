"""RL losses as pure tensor functions (GRPO and PPO), with the metrics TRL users expect (TRL's names).

Shapes: ``N`` completions, ``T`` completion tokens; per-token tensors are ``[N, T]`` with a
``mask`` ``[N, T]`` (1 on real completion tokens, EOS included). Log-probs are of the sampled
tokens. Definitions follow TRL (``GRPOTrainer._compute_loss`` and the former ``PPOTrainer``):

GRPO (Shao et al. 2024; Dr. GRPO, Liu et al. 2025; DAPO, Yu et al. 2025), TRL 1.16's ``loss_type``s
    A_i    = (r_i - mean_group(r)) [/ (std_group(r) + 1e-4)]
    rho_t  = exp(logp_t - logp_old_t)
    L_t    = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i) + beta * KL3_t
    KL3_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1           (k3, unbiased, >= 0)
    over the N completions of one optimiser step's (mini)batch on this process:
    grpo:    mean_i( sum_t L_t m_t / sum_t m_t )                    (per-sequence mean, then batch mean)
    bnpo:    sum_{i,t} L_t m_t / sum_{i,t} m_t                      (token-level mean over the local batch)
    dr_grpo: sum_{i,t} L_t m_t / (N * T_max)                        (per-sequence sum / max completion length)
    dapo:    sum_{i,t} L_t m_t / (M_gen / (P * S))                  (token-level mean over the global batch)
    where M_gen is the number of completion tokens of the whole generation (rollout) batch, summed
    over the P processes, and S the number of optimiser steps it is split into (TRL's
    ``steps_per_generation``; here ``num_minibatches``). Gradients are averaged over processes
    (DDP), so a dapo step weighs every token of every process's minibatch alike; bnpo's weight
    depends on how many tokens the process's own minibatch has. With one process and one
    minibatch, dapo = bnpo.

PPO (Schulman et al. 2017; Ouyang et al. 2022)
    r_t    = -kl_coef * (logp_old_t - ref_t)  (+ score on the last real token)
    GAE:     delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  R_t = A_t + V_t
    L      = pg + vf_coef * vf - ent_coef * H
    pg     = masked_mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps)))
    vf     = 0.5 * masked_mean(max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2))
"""

from __future__ import annotations

import torch

from unveil.rewards.composite import group_spread

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # TRL's names and definitions (GRPOConfig.loss_type)
# What each loss type averages over, so a micro-batch's loss is weighted by its share of it:
# a mean over completions, over completion tokens, or a normaliser fixed for the whole batch.
LOSS_SCALE = {"grpo": "rows", "bnpo": "tokens", "dr_grpo": "rows", "dapo": "none"}
SCALE_REWARDS = ("group", "batch", "none")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries (TRL's ``masked_whiten``); masked entries -> 0."""
    white = (x - masked_mean(x, mask)) * torch.rsqrt(masked_var(x, mask) + eps)
    return white * mask.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------
def group_advantages(
    rewards: torch.Tensor, group: torch.Tensor, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages ``[N]``: reward minus its group's mean, optionally / (std + eps).

    ``group`` holds the prompt index of each completion (any integer ids). ``scale``: ``group``
    (std of the group, as in GRPO), ``batch`` (std of the whole batch) or ``none`` (Dr. GRPO).
    Stds are unbiased (Bessel), as in TRL; a group of one has advantage 0.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale!r}; expected one of {SCALE_REWARDS}")
    r = rewards.float()
    _, inv, counts = torch.unique(group, return_inverse=True, return_counts=True)
    n = counts.to(r.dtype)
    mean = torch.zeros_like(n).index_add_(0, inv, r) / n
    adv = r - mean[inv]
    if scale == "group":
        ss = torch.zeros_like(n).index_add_(0, inv, adv**2)
        std = torch.where(n > 1, (ss / (n - 1).clamp(min=1)).sqrt(), torch.zeros_like(n))
        adv = adv / (std[inv] + eps)
    elif scale == "batch":
        std = r.std() if r.numel() > 1 else r.new_zeros(())
        adv = adv / (std + eps)
    return adv


def group_has_spread(rewards: torch.Tensor, group: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """``[N]`` bool: whether the completion's group holds rewards that differ by more than ``tol``.
    A group without spread has zero group-relative advantage (DAPO's dynamic-sampling criterion)."""
    spread, _, inv = group_spread(rewards, group)
    return spread[inv] > tol


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref) on samples from pi: ``exp(d) - d - 1``, ``d = ref - logp``."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def clipped_surrogate(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Per-token ``-min(rho A, clip(rho, 1-eps_low, 1+eps_high) A)``; returns (loss, ratio, clipped).

    ``advantages`` is ``[N]`` (one per sequence) or ``[N, T]``. ``clipped`` is a pair of masks of
    the tokens whose gradient the clip removed, as TRL counts them: (low) ``rho < 1 - eps_low``
    with ``A < 0``, (high) ``rho > 1 + eps_high`` with ``A > 0``.
    """
    eps_high = eps_low if eps_high is None else eps_high
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    low = (ratio < 1 - eps_low) & (advantages < 0)
    high = (ratio > 1 + eps_high) & (advantages > 0)
    return loss, ratio, (low, high)


def clip_metrics(clipped: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's ``clip_ratio/*`` (``GRPOTrainer._compute_loss``): the fraction of completion tokens
    clipped low, high, either (``region``), and the min (low) / max (high) over sequences of
    the per-sequence fraction (sequences without tokens left out)."""
    low, high = (c.float() for c in clipped)
    with torch.no_grad():
        per_seq = lambda x: (x * mask).sum(-1) / mask.sum(-1)  # noqa: E731  NaN for an empty row, as TRL
        low_seq, high_seq = per_seq(low), per_seq(high)
        ok = torch.isfinite(low_seq)
        nan = low.new_tensor(float("nan"))
        return {
            "clip_ratio/low_mean": masked_mean(low, mask),
            "clip_ratio/high_mean": masked_mean(high, mask),
            "clip_ratio/region_mean": masked_mean(torch.maximum(low, high), mask),
            "clip_ratio/low_min": low_seq[ok].min() if ok.any() else nan,
            "clip_ratio/high_max": high_seq[ok].max() if ok.any() else nan,
        }


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
    num_processes: int = 1,
    steps_per_generation: int = 1,
) -> torch.Tensor:
    """Reduce a per-token loss ``[N, T]`` to a scalar by ``loss_type`` (see module docstring), as
    TRL's ``GRPOTrainer._compute_loss`` does without gradient accumulation.

    ``dapo`` only: ``num_items_in_batch`` is the number of completion tokens of the whole
    generation batch over all ``num_processes`` processes (TRL's ``num_items_in_batch``; default:
    this batch's, i.e. one process and one step), ``steps_per_generation`` the optimiser steps the
    generation batch is split into.
    """
    m = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * m).sum() / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        length = max_completion_length or per_token.shape[1]
        return (per_token * m).sum() / (per_token.shape[0] * length)
    if loss_type == "dapo":
        n = m.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=per_token.dtype)
        normalizer = n.to(per_token.device).clamp(min=1.0) / (int(num_processes) * int(steps_per_generation))
        return (per_token * m).sum() / normalizer
    raise ValueError(f"loss_type={loss_type!r}; expected one of {', '.join(LOSS_TYPES)} (TRL's names)")


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    entropy: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
    num_processes: int = 1,
    steps_per_generation: int = 1,
    is_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO objective and its metrics: TRL's ``kl``, ``entropy`` and ``clip_ratio/*``, and
    ``approx_kl`` (``0.5 (logp - logp_old)^2``) and ``ratio`` (mean importance ratio).
    ``is_ratio`` ``[N, T]`` (:func:`truncated_is_ratio`) weights the policy-gradient term per token,
    before the KL term is added, as TRL does."""
    per_token, ratio, clipped = clipped_surrogate(logps, old_logps, advantages, eps_low, eps_high)
    if is_ratio is not None:
        per_token = per_token * is_ratio
    metrics: dict[str, torch.Tensor] = {}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs the reference log-probs")
        kl = kl_k3(logps, ref_logps)
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl, mask).detach()
    elif ref_logps is not None:
        metrics["kl"] = masked_mean(kl_k3(logps, ref_logps), mask).detach()
    loss = aggregate(
        per_token, mask, loss_type, max_completion_length, num_items_in_batch, num_processes, steps_per_generation
    )
    with torch.no_grad():
        metrics.update(clip_metrics(clipped, mask))
        metrics["approx_kl"] = 0.5 * masked_mean((logps - old_logps) ** 2, mask)
        metrics["ratio"] = masked_mean(ratio, mask)
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy, mask)
    return loss, metrics


def truncated_is_ratio(
    old_logps: torch.Tensor, sampler_logps: torch.Tensor | None, mask: torch.Tensor, cap: float = 3.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance sampling for a sampler that is not the trainer (vLLM), per token:

        w_t = min(exp(logp_old(y_t) - logp_sampler(y_t)), C)

    (TRL's ``vllm_importance_sampling_mode=token_truncate`` with ``clip_max`` C; verl's TIS). The
    ratio is 1 on padding and where the sampler gave no log-prob (NaN); ``sampler_logps=None`` (the
    policy sampled itself) gives exactly 1 everywhere. Metrics under TRL's names: the mismatch
    ``sampling/sampling_logp_difference/{mean,max}`` (of ``|logp_old - logp_sampler|`` over real
    tokens) and ``sampling/importance_sampling_ratio/{min,mean,max}``."""
    if sampler_logps is None:
        return torch.ones_like(old_logps), {}
    m = mask.bool()
    diff = torch.nan_to_num((old_logps - sampler_logps) * m, nan=0.0)
    ratio = torch.exp(diff).clamp(max=cap).detach()
    with torch.no_grad():
        delta = (old_logps - sampler_logps).abs()[m & ~torch.isnan(sampler_logps)]
        zero = old_logps.new_zeros(())
        r = ratio[m]
        metrics = {
            "sampling/sampling_logp_difference/mean": delta.mean() if delta.numel() else zero,
            "sampling/sampling_logp_difference/max": delta.max() if delta.numel() else zero,
            "sampling/importance_sampling_ratio/min": r.min() if r.numel() else zero + 1,
            "sampling/importance_sampling_ratio/mean": r.mean() if r.numel() else zero + 1,
            "sampling/importance_sampling_ratio/max": r.max() if r.numel() else zero + 1,
        }
    return ratio, metrics


# ---------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------
def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row ``[N]`` (0 for an empty row)."""
    t = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), t, torch.zeros_like(t)).max(1).values


def ppo_token_rewards(
    scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor | None, mask: torch.Tensor, kl_coef: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``[N, T]``: ``-kl_coef * (logp - ref)`` on every token, plus the sequence's
    score on its last real token. Returns (rewards, per-token k1 KL)."""
    m = mask.to(logps.dtype)
    kl = (logps - ref_logps) * m if ref_logps is not None else torch.zeros_like(logps)
    rewards = -kl_coef * kl
    rewards = rewards.scatter_add(1, last_token_index(mask).unsqueeze(1), scores.to(rewards.dtype).unsqueeze(1))
    return rewards * m, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over completion tokens; returns (advantages, returns).

    The episode ends after the last real token (its next value is 0); padded positions get 0.
    ``lam = 1`` gives Monte-Carlo returns minus the value baseline.
    """
    m = mask.to(values.dtype)
    rewards, values = rewards * m, values * m
    T = rewards.shape[1]
    last = torch.zeros_like(values[:, 0])
    out = []
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t < T - 1 else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    adv = torch.stack(out[::-1], dim=1) * m
    return adv, (adv + values) * m


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float | None = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ``0.5 * masked_mean(max((V-R)^2, (V_clip-R)^2))``; returns (loss, clip fraction)."""
    l1 = (values - returns) ** 2
    if clip is None:
        return 0.5 * masked_mean(l1, mask), values.new_zeros(())
    v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
    l2 = (v_clip - returns) ** 2
    return 0.5 * masked_mean(torch.max(l1, l2), mask), masked_mean((l2 > l1).float(), mask).detach()


def ppo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    entropy: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    value_clip: float | None = 0.2,
    vf_coef: float = 0.1,
    ent_coef: float = 0.0,
    is_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip actor-critic loss (token-level advantages ``[N, T]``) and its metrics; ``is_ratio``
    (:func:`truncated_is_ratio`) weights the policy-gradient term per token."""
    per_token, ratio, clipped = clipped_surrogate(logps, old_logps, advantages, clip_eps, clip_eps)
    if is_ratio is not None:
        per_token = per_token * is_ratio
    pg = masked_mean(per_token, mask)
    vf, vf_clip_frac = value_loss(values, old_values, returns, mask, value_clip)
    loss = pg + vf_coef * vf
    ent = masked_mean(entropy, mask) if entropy is not None else None
    if ent is not None and ent_coef:
        loss = loss - ent_coef * ent
    with torch.no_grad():
        metrics = {
            "policy_loss": pg.detach(),
            "value_loss": vf.detach(),
            **clip_metrics(clipped, mask),
            "value_clip_ratio": vf_clip_frac,
            "approx_kl": 0.5 * masked_mean((logps - old_logps) ** 2, mask),
            "ratio": masked_mean(ratio, mask),
        }
        if ent is not None:
            metrics["entropy"] = ent.detach()
    return loss, metrics
