"""GRPO / PPO losses (unveil.stages.losses) against values computed by hand on toy tensors."""

from __future__ import annotations

import math

import pytest
import torch

from unveil.stages.losses import (
    aggregate,
    clipped_surrogate,
    gae,
    group_advantages,
    group_has_spread,
    grpo_loss,
    kl_k3,
    last_token_index,
    masked_whiten,
    ppo_loss,
    ppo_token_rewards,
    value_loss,
)

T = torch.tensor


def close(a, b, tol=1e-5):
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=0
    )


# --- advantages -------------------------------------------------------------------------------
def test_group_advantages_mean_centred_and_std_scaled():
    r = T([1.0, 2.0, 3.0, 0.0, 0.0, 4.0])
    g = T([0, 0, 0, 1, 1, 1])
    # group 0: mean 2, unbiased std 1; group 1: mean 4/3, unbiased std sqrt(48/9)
    s1 = math.sqrt(48 / 9)
    expected = [-1 / 1.0001, 0.0, 1 / 1.0001, (-4 / 3) / (s1 + 1e-4), (-4 / 3) / (s1 + 1e-4), (8 / 3) / (s1 + 1e-4)]
    assert close(group_advantages(r, g, "group"), expected)
    assert close(group_advantages(r, g, "none"), [-1, 0, 1, -4 / 3, -4 / 3, 8 / 3])
    batch_std = float(r.std())
    assert close(group_advantages(r, g, "batch"), T([-1, 0, 1, -4 / 3, -4 / 3, 8 / 3]) / (batch_std + 1e-4))


def test_group_advantages_any_group_ids_and_degenerate_groups():
    # interleaved, non-contiguous ids; a group with equal rewards and a singleton group give 0
    r = T([5.0, 1.0, 5.0, 3.0, 7.0])
    g = T([7, 2, 7, 2, 9])
    adv = group_advantages(r, g, "group")
    assert close(adv, [0.0, -1 / (math.sqrt(2) + 1e-4), 0.0, 1 / (math.sqrt(2) + 1e-4), 0.0])
    assert torch.isfinite(adv).all()
    with pytest.raises(ValueError):
        group_advantages(r, g, "median")


def test_group_has_spread_marks_groups_with_differing_rewards():
    r = T([0.5, 0.5, 0.5, 0.1, 0.9, 1.0, 2.0, 7.0])
    g = T([4, 4, 4, 1, 1, 0, 9, 9])  # equal rewards, differing, a singleton, differing
    assert group_has_spread(r, g).tolist() == [False, False, False, True, True, False, True, True]
    assert group_has_spread(T([1.0, 1.0 + 1e-8]), T([0, 0])).tolist() == [False, False]  # within tolerance


# --- clipped surrogate, KL --------------------------------------------------------------------
def test_clipped_surrogate_hand_values_and_clip_mask():
    ratios = T([[1.5, 0.5, 0.5, 1.5, 1.0]])
    adv = T([[1.0, 1.0, -1.0, -1.0, 2.0]])
    logps = torch.log(ratios).requires_grad_(True)
    old = torch.zeros_like(logps)
    loss, ratio, clipped = clipped_surrogate(logps, old, adv, eps_low=0.2)
    # min(rho A, clip(rho) A): (1.5,+1) -> 1.2 clipped; (0.5,+1) -> 0.5; (0.5,-1) -> -0.8 clipped;
    # (1.5,-1) -> -1.5; (1,2) -> 2
    assert close(loss, [[-1.2, -0.5, 0.8, 1.5, -2.0]])
    assert close(ratio, ratios)
    low, high = clipped
    assert high.tolist() == [[True, False, False, False, False]] and low.tolist() == [
        [False, False, True, False, False]
    ]
    # clipped tokens carry no gradient; unclipped ones get -A * rho
    loss.sum().backward()
    assert close(logps.grad, [[0.0, -0.5, 0.0, 1.5, -2.0]])


def test_clipped_surrogate_asymmetric_clip_higher():
    logps, old = torch.log(T([[1.25, 0.75]])), torch.zeros(1, 2)
    adv = T([1.0])  # one advantage per sequence broadcasts over tokens
    sym, _, c_sym = clipped_surrogate(logps, old, adv, 0.2, 0.2)
    dapo, _, c_dapo = clipped_surrogate(logps, old, adv, 0.2, 0.28)
    assert close(sym, [[-1.2, -0.75]]) and c_sym[1].tolist() == [[True, False]]
    assert close(dapo, [[-1.25, -0.75]]) and c_dapo[1].tolist() == [[False, False]]


def test_kl_k3_hand_value_and_non_negative():
    lp, ref = torch.log(T([0.5, 0.3])), torch.log(T([0.25, 0.3]))
    # d = ref - lp = -ln 2: exp(d) - d - 1 = 0.5 + ln 2 - 1
    assert close(kl_k3(lp, ref), [0.5 + math.log(2) - 1, 0.0])
    x, y = torch.randn(100), torch.randn(100)
    assert (kl_k3(x, y) >= 0).all()


# --- aggregation per loss_type ----------------------------------------------------------------
def test_aggregations():
    per_token = T([[1.0, 2.0, 3.0], [4.0, 50.0, 60.0]])
    mask = T([[1, 1, 1], [1, 0, 0]])
    assert close(aggregate(per_token, mask, "grpo"), (6 / 3 + 4 / 1) / 2)  # per-sequence mean, then mean
    assert close(aggregate(per_token, mask, "dr_grpo", max_completion_length=4), (6 + 4) / (2 * 4))
    assert close(aggregate(per_token, mask, "dr_grpo"), (6 + 4) / (2 * 3))  # default length: T
    assert close(aggregate(per_token, mask, "dapo"), 10 / 4)  # token-level mean over the batch
    with pytest.raises(ValueError):
        aggregate(per_token, mask, "bnpo_typo")


def test_grpo_loss_combines_surrogate_kl_and_aggregation():
    logps = torch.log(T([[0.6, 0.5], [0.4, 0.9]]))
    old = torch.log(T([[0.5, 0.5], [0.5, 0.9]]))
    ref = torch.log(T([[0.5, 0.25], [0.5, 0.9]]))
    mask = T([[1, 1], [1, 0]])
    adv = T([1.0, -1.0])
    beta = 0.1
    # token losses: row 0: rho = 1.2, 1.0 with A = +1 -> -1.2, -1.0; row 1: rho = 0.8 with A = -1 -> 0.8
    k = [[kl_k3(logps[0, 0], ref[0, 0]), kl_k3(logps[0, 1], ref[0, 1])], [kl_k3(logps[1, 0], ref[1, 0]), 0.0]]
    row0 = (-1.2 + beta * k[0][0]) + (-1.0 + beta * k[0][1])
    row1 = 0.8 + beta * k[1][0]
    loss, m = grpo_loss(logps, old, adv, mask, ref, beta=beta, loss_type="grpo")
    assert close(loss, (row0 / 2 + row1 / 1) / 2)
    loss, _ = grpo_loss(logps, old, adv, mask, ref, beta=beta, loss_type="dapo")
    assert close(loss, (row0 + row1) / 3)
    loss, _ = grpo_loss(logps, old, adv, mask, ref, beta=beta, loss_type="dr_grpo", max_completion_length=5)
    assert close(loss, (row0 + row1) / (2 * 5))
    assert close(m["kl"], (k[0][0] + k[0][1] + k[1][0]) / 3)
    assert close(m["clip_ratio/region_mean"], 0.0)  # 1.2 and 0.8 sit exactly on the clip boundary
    assert close(m["approx_kl"], 0.5 * (math.log(1.2) ** 2 + math.log(0.8) ** 2) / 3)
    with pytest.raises(ValueError):
        grpo_loss(logps, old, adv, mask, None, beta=0.1)


def test_grpo_loss_first_iteration_gradient_is_policy_gradient():
    """With old = current (ratio 1) and beta 0, the gradient is -A / |o| per token (grpo aggregation)."""
    logps = torch.log(T([[0.3, 0.6, 0.2]])).requires_grad_(True)
    mask = T([[1, 1, 0]])
    loss, m = grpo_loss(logps, logps.detach(), T([2.0]), mask, loss_type="grpo")
    loss.backward()
    assert close(logps.grad, [[-1.0, -1.0, 0.0]])
    assert close(m["ratio"], 1.0) and close(m["clip_ratio/region_mean"], 0.0)


# --- PPO ----------------------------------------------------------------------------------------
def test_last_token_index_and_token_rewards():
    mask = T([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 1, 0]
    lp = T([[-1.0, -2.0, -1.0], [-0.5, -0.5, -9.0], [0.0, 0.0, 0.0]])
    ref = T([[-1.5, -1.0, -1.0], [-0.5, -1.5, -3.0], [0.0, 0.0, 0.0]])
    rewards, kl = ppo_token_rewards(T([1.0, 2.0, 0.0]), lp, ref, mask, kl_coef=0.1)
    assert close(kl, [[0.5, -1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert close(rewards, [[-0.05, 0.1, 1.0], [0.0, -0.1 + 2.0, 0.0], [0.0, 0.0, 0.0]])


def test_gae_matches_hand_recursion():
    rewards = T([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])  # the 5.0 sits on padding: ignored
    values = T([[0.5, 0.6, 0.7], [0.1, 0.2, 9.0]])
    mask = T([[1, 1, 1], [1, 1, 0]])
    gamma, lam = 0.9, 0.8
    # row 0: d2 = 1 - 0.7 = 0.3; d1 = 0.9*0.7 - 0.6 = 0.03; d0 = 0.9*0.6 - 0.5 = 0.04
    a2 = 0.3
    a1 = 0.03 + gamma * lam * a2
    a0 = 0.04 + gamma * lam * a1
    # row 1 ends at t=1: d1 = 2 - 0.2 = 1.8; d0 = 0.9*0.2 - 0.1 = 0.08
    b1 = 1.8
    b0 = 0.08 + gamma * lam * b1
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert close(adv, [[a0, a1, a2], [b0, b1, 0.0]])
    assert close(ret, [[a0 + 0.5, a1 + 0.6, a2 + 0.7], [b0 + 0.1, b1 + 0.2, 0.0]])
    # lam = 1, gamma = 1: Monte-Carlo return-to-go minus the value
    adv1, ret1 = gae(rewards, values, mask, 1.0, 1.0)
    assert close(ret1, [[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]])
    assert close(adv1, [[0.5, 0.4, 0.3], [1.9, 1.8, 0.0]])


def test_value_loss_clipping():
    mask = T([[1.0, 1.0, 0.0]])
    old = T([[0.5, 0.5, 0.5]])
    v = T([[1.0, 1.0, 99.0]])
    # token 0: R = 0: unclipped (1.0)^2 = 1 beats clipped (0.7)^2 = 0.49 -> 1
    # token 1: R = 2: clipped (0.7 - 2)^2 = 1.69 beats (1 - 2)^2 = 1 -> 1.69 (the clip binds)
    loss, frac = value_loss(v, old, T([[0.0, 2.0, 0.0]]), mask, clip=0.2)
    assert close(loss, 0.5 * (1.0 + 1.69) / 2)
    assert close(frac, 0.5)
    loss, frac = value_loss(v, old, T([[0.0, 2.0, 0.0]]), mask, clip=None)
    assert close(loss, 0.5 * (1.0 + 1.0) / 2) and close(frac, 0.0)


def test_ppo_loss_total_and_metrics():
    mask = T([[1.0, 1.0]])
    logps = torch.log(T([[1.5, 1.0]]))
    old = torch.zeros(1, 2)
    adv = T([[1.0, -2.0]])
    v, old_v, ret = T([[0.5, 0.5]]), T([[0.0, 0.0]]), T([[1.0, 3.0]])
    ent = T([[2.0, 4.0]])
    loss, m = ppo_loss(
        logps, old, adv, mask, v, old_v, ret, entropy=ent, clip_eps=0.2, value_clip=0.2, vf_coef=0.5, ent_coef=0.01
    )
    pg = (-1.2 + 2.0) / 2  # token 0 clipped at 1.2; token 1: -(-2 * 1)
    vf = 0.5 * ((0.2 - 1) ** 2 + (0.2 - 3) ** 2) / 2  # V = 0.5 clipped to 0.2 around V_old = 0: larger errors
    assert close(m["policy_loss"], pg) and close(m["value_loss"], vf)
    assert close(loss, pg + 0.5 * vf - 0.01 * 3.0)
    assert close(m["clip_ratio/region_mean"], 0.5) and close(m["entropy"], 3.0) and close(m["value_clip_ratio"], 1.0)
    # token 0 (rho 1.5, A > 0) clipped high; its sequence is the only one
    assert close(m["clip_ratio/high_mean"], 0.5) and close(m["clip_ratio/low_mean"], 0.0)
    assert close(m["clip_ratio/high_max"], 0.5) and close(m["clip_ratio/low_min"], 0.0)


def test_masked_whiten():
    x = T([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = T([[1, 1, 0], [1, 1, 0]])
    w = masked_whiten(x, mask)
    vals = w[mask.bool()]
    assert close(vals.mean(), 0.0) and close(vals.var(unbiased=True), 1.0, tol=1e-4)
    assert close(w[:, 2], [0.0, 0.0])
