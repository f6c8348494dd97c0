"""``stage.micro_batch_size``: gradients accumulated over micro-batches inside one manual optimiser
step equal those of one pass over the whole batch, for GRPO (every loss type), PPO and DPO: the
gradients the optimiser steps on are compared (after an Adam step, parameters whose gradient is
near Adam's eps would amplify float summation order into visible weight differences)."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from test_dpo import text_pairs
from test_rl_stages import TokenReward, tiny  # noqa: F401  (the tiny LLaVA and its data)
from torch.utils.data import DataLoader


class GradTap(pl.Callback):
    """The gradients each optimiser step is taken on, by parameter name."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def one_step(module, samples, root) -> dict[str, torch.Tensor]:
    """One optimiser step of ``module`` on one batch of ``samples``; the gradients it stepped on."""
    pl.seed_everything(0)
    loader = DataLoader(samples, batch_size=len(samples), shuffle=False, collate_fn=module.collator)
    tap = GradTap()
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    # one optimiser step, no validation; runs write under root (PPO's value_head.pt)
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", limit_val_batches=0, callbacks=[tap], default_root_dir=root, **quiet
    )
    trainer.fit(module, train_dataloaders=loader)
    assert len(tap.grads) == 1  # one optimiser step, however many micro-batches
    return tap.grads[0]


def assert_same_gradients(whole: dict, micro: dict) -> None:
    assert whole and whole.keys() == micro.keys()
    assert any(g.abs().max() > 0 for g in whole.values())  # a real gradient, so equality means something
    for k in whole:
        torch.testing.assert_close(micro[k], whole[k], atol=1e-7, rtol=1e-4, msg=k)


def prompts(dm, n: int = 4):
    return [s for s in dm.data["train"] if s.task == "localize"][:n]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_micro_batches_equal_one_update(tiny, loss_type, tmp_path):  # noqa: F811
    from unveil.stages.grpo import GRPOModule

    dm, make = tiny
    bb = make()
    kw = dict(num_generations=3, max_new_tokens=8, beta=0.04, loss_type=loss_type, log_completions_every=0)
    reward = TokenReward(set(range(5, 60)))
    out = {}
    for micro in (None, 3, 2):  # 2 < G: one group per micro-batch (groups stay whole)
        module = GRPOModule(copy.deepcopy(bb), reward, optim={"lr": 1e-3}, micro_batch_size=micro, **kw)
        out[micro] = one_step(module, prompts(dm), tmp_path / str(micro))
    assert_same_gradients(out[None], out[3])
    assert_same_gradients(out[None], out[2])


def test_ppo_micro_batches_equal_one_update(tiny, tmp_path):  # noqa: F811
    from unveil.stages.ppo import PPOModule

    dm, make = tiny
    bb = make()
    out = {}
    for micro in (None, 4):
        module = PPOModule(
            copy.deepcopy(bb),
            TokenReward(set(range(5, 60))),
            optim={"lr": 1e-3},
            num_generations=2,
            max_new_tokens=8,
            ppo_epochs=1,
            ent_coef=0.01,
            micro_batch_size=micro,
            log_completions_every=0,
        )
        out[micro] = one_step(module, prompts(dm), tmp_path / str(micro))
    assert any(k.startswith("value_head") for k in out[None])
    assert_same_gradients(out[None], out[4])


def test_dpo_micro_batches_equal_one_update(tiny, tmp_path):  # noqa: F811
    from unveil.stages.dpo import DPOModule

    dm, make = tiny
    bb = make()
    pairs = text_pairs(dm.data["train"], 4, weights=[1.0, 0.5, 0.25, 1.5])
    out = {}
    for micro in (None, 1, 3):
        module = DPOModule(copy.deepcopy(bb), optim={"lr": 1e-3}, weight_norm="raw", micro_batch_size=micro)
        out[micro] = one_step(module, pairs, tmp_path / str(micro))
    assert_same_gradients(out[None], out[1])
    assert_same_gradients(out[None], out[3])
