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
    assert close(aggregate(per_token, mask, "bnpo"), 10 / 4)  # token-level mean over the local batch
    assert close(aggregate(per_token, mask, "dapo"), 10 / 4)  # one process, one step: = bnpo
    # dapo: the generation batch had 12 tokens over 2 processes, split into 3 optimiser steps:
    # each step's token sum is divided by the tokens a step has on average on one process (12 / 6)
    assert close(aggregate(per_token, mask, "dapo", num_items_in_batch=12, num_processes=2, steps_per_generation=3), 5)
    with pytest.raises(ValueError, match="grpo, bnpo, dr_grpo, dapo"):
        aggregate(per_token, mask, "bnpo_typo")


# --- parity with TRL 1.16's GRPOTrainer._compute_loss, one test per loss_type -------------------
def trl_grpo_loss(loss_type, logps, old, ref, adv, mask, entropies, num_items, num_processes, steps_per_generation):
    """TRL's own ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py) on these tensors: called
    on a stand-in for the trainer that holds only what the method reads, with the policy's log-probs
    and entropies as ``_get_per_token_logps_and_entropies`` would return them. One optimiser step
    per micro-batch (gradient_accumulation_steps 1), no vLLM, no entropy mask, token-level ratios.
    Returns (loss, TRL's logged metrics)."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import GRPOTrainer

    # the objective's settings, and TRL's features this comparison leaves off
    objective = dict(loss_type=loss_type, beta=0.04, epsilon_low=0.2, epsilon_high=0.28, max_completion_length=6)
    off = dict(top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token")
    off.update(use_vllm=False, vllm_importance_sampling_correction=False, _entropy_bonus_enabled=False)
    trainer = SimpleNamespace(
        **objective,
        **off,
        aux_loss_enabled=False,
        current_gradient_accumulation_steps=1,
        model=SimpleNamespace(training=True),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=steps_per_generation),
        # one process's view: reduce/gather over a single process are identities
        accelerator=SimpleNamespace(num_processes=num_processes, reduce=lambda t, reduction: t, gather=lambda t: t),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropies, None),
    )
    n, t = mask.shape
    inputs = {
        "prompt_ids": torch.zeros(n, 3, dtype=torch.long),
        "prompt_mask": torch.ones(n, 3, dtype=torch.long),
        "completion_ids": torch.zeros(n, t, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": torch.tensor(num_items),
    }
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize(
    ("loss_type", "num_processes", "steps_per_generation"),
    [("grpo", 1, 1), ("bnpo", 1, 1), ("dr_grpo", 1, 1), ("dapo", 1, 1), ("dapo", 2, 1), ("dapo", 2, 3)],
)
def test_grpo_loss_matches_trl(loss_type, num_processes, steps_per_generation):
    pytest.importorskip("trl")
    from unveil.stages.losses import LOSS_TYPES

    assert loss_type in LOSS_TYPES
    g = torch.Generator().manual_seed(0)
    n, t = 4, 5
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    logps = (-torch.rand(n, t, generator=g) * 2).requires_grad_(True)
    old = logps.detach() + 0.5 * torch.randn(n, t, generator=g)  # ratios on both sides of the clip range
    ref = logps.detach() + 0.5 * torch.randn(n, t, generator=g)
    adv = torch.tensor([1.5, -0.7, 0.4, -1.2])
    entropies = torch.rand(n, t, generator=g) * 3
    num_items = 29.0 if num_processes > 1 else float(mask.sum())  # the generation batch's tokens, all processes

    trl_loss, trl_m = trl_grpo_loss(
        loss_type, logps, old, ref, adv, mask, entropies, num_items, num_processes, steps_per_generation
    )
    (trl_grad,) = torch.autograd.grad(trl_loss, logps)
    loss, m = grpo_loss(
        logps,
        old,
        adv,
        mask,
        ref,
        beta=0.04,
        eps_low=0.2,
        eps_high=0.28,
        loss_type=loss_type,
        max_completion_length=6,
        entropy=entropies,
        num_items_in_batch=num_items if num_processes > 1 else None,
        num_processes=num_processes,
        steps_per_generation=steps_per_generation,
    )
    (grad,) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(loss, trl_loss)
    torch.testing.assert_close(grad, trl_grad)
    for k in (
        "kl",
        "entropy",
        *(f"clip_ratio/{c}" for c in ("low_mean", "high_mean", "region_mean", "low_min", "high_max")),
    ):
        assert close(m[k], trl_m[k]), (k, float(m[k]), trl_m[k])
    assert trl_m["clip_ratio/low_mean"] > 0 and trl_m["clip_ratio/high_mean"] > 0  # both sides exercised


def test_loss_types_are_trls():
    """Every loss_type offered here is one of TRL 1.16's, under the same name."""
    pytest.importorskip("trl")
    import inspect

    from trl import GRPOTrainer

    from unveil.stages.losses import LOSS_TYPES

    src = inspect.getsource(GRPOTrainer._compute_loss)
    assert all(f'"{name}"' in src for name in LOSS_TYPES)


def _dapo_rank(rank: int, world: int, init: str, rows: list, out: str) -> None:
    """One process of the two-process dapo check: its share of the rows, the token count
    all-reduced as the GRPO stage does it, and the gradient averaged over processes as DDP does."""
    import torch.distributed as dist

    from unveil.utils.dist import all_reduce_sum, world_size

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        per_token, mask = (torch.tensor(x) for x in rows[rank])
        w = torch.ones((), requires_grad=True)
        num_items = all_reduce_sum(mask.sum().float())
        aggregate(w * per_token, mask, "dapo", num_items_in_batch=num_items, num_processes=world_size()).backward()
        grad = w.grad.clone()
        dist.all_reduce(grad)
        if rank == 0:
            torch.save({"grad": grad / world, "num_items": num_items}, out)
    finally:
        dist.destroy_process_group()


def test_dapo_over_two_processes_is_the_token_mean_of_both(tmp_path):
    """Processes with different numbers of completion tokens: dapo's DDP-averaged gradient is the
    gradient of the token mean over both processes' tokens (bnpo's would weigh them per process)."""
    import torch.multiprocessing as mp

    rows = [
        ([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [[1, 1, 1], [1, 1, 0]]),  # 5 tokens, sum 15
        ([[10.0, 20.0, 30.0]], [[1, 0, 0]]),  # 1 token, sum 10
    ]
    out = tmp_path / "rank0.pt"
    mp.spawn(_dapo_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", rows, str(out)), nprocs=2)
    res = torch.load(out)
    assert res["num_items"] == 6
    assert close(res["grad"], (15 + 10) / 6)  # d/dw of the global token mean of w * per_token
    bnpo = ((15 / 5) + (10 / 1)) / 2
    assert not close(res["grad"], bnpo)


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
    for loss_type in ("bnpo", "dapo"):  # one process, one step: both are the token mean
        loss, _ = grpo_loss(logps, old, adv, mask, ref, beta=beta, loss_type=loss_type)
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
