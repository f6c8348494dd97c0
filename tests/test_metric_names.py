"""Every stage logs TRL's metric names (``GRPOTrainer``'s and ``DPOTrainer``'s) under Lightning's
``train/`` and ``val/`` prefixes: the ``csv/metrics.csv`` of a GRPO, a PPO and a DPO debug run."""

from __future__ import annotations

import csv

import pytest

# The reward heads of reward=umed that apply to every localisation prompt
HEADS = ("relevance", "localization")
ROLLOUT = (
    "reward",
    "reward_std",
    "frac_reward_zero_std",
    *(f"rewards/{h}/{s}" for h in HEADS for s in ("mean", "std")),
    "completions/mean_length",
    "completions/min_length",
    "completions/max_length",
    "completions/clipped_ratio",
)
RL_TRAIN = (
    "loss",
    "grad_norm",
    "kl",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    *ROLLOUT,
)
RL_VAL = (
    "loss",
    "reward",
    "completions/mean_length",
    "completions/clipped_ratio",
    *(f"rewards/{h}/mean" for h in HEADS),
)
DPO = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
EXPECTED = {
    "grpo": [f"train/{k}" for k in RL_TRAIN] + [f"val/{k}" for k in RL_VAL],
    "ppo": [f"train/{k}" for k in RL_TRAIN] + [f"val/{k}" for k in RL_VAL],
    "dpo": [f"{p}/{k}" for p in ("train", "val") for k in DPO],
}
# the names the stages logged before (and their pieces)
OLD = ("reward/", "val/reward/", "clip_frac", "completion_len", "truncated_frac", "zero_spread")


def header(run_dir) -> list[str]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f).fieldnames or [])


@pytest.mark.parametrize("stage", ["grpo", "ppo", "dpo"])
def test_debug_run_logs_trl_metric_names(make_cfg, tmp_path, synthetic_dir, stage):
    from unveil.train import train

    # validation after every batch: PPO makes 2 optimiser steps per batch (max_steps=3 ends after 2 batches)
    common = [
        "debug=fast",
        "model.vision_pretrain.steps=0",
        "eval.enabled=false",
        "data.max_samples.val=2",
        "trainer.val_check_interval=1",
    ]
    if stage == "dpo":
        from test_dpo import _write_preference_set

        data = tmp_path / "pref"
        _write_preference_set(synthetic_dir, data)
        overrides = ["stage=dpo", "data=mau_jsonl", f"data.root={data}", "data.synthetic=null", "data.batch_size=2"]
    else:
        overrides = [
            f"stage={stage}",
            "reward=umed",
            "data.train_tasks=[localize]",
            "data.batch_size=2",
            "stage.num_generations=2",
            "stage.max_new_tokens=8",
        ]
    cfg = make_cfg(*common, *overrides)
    train(cfg)
    cols = header(tmp_path / "run")
    missing = [k for k in EXPECTED[stage] if k not in cols]
    assert not missing, (missing, cols)
    old = [c for c in cols if any(c.startswith(o) if o.endswith("/") else o in c for o in OLD)]
    assert not old, old
    # one scheme: every metric (but the step counters and the learning rate) under train/ or val/
    assert all(c.split("/")[0] in ("train", "val") for c in cols if c not in ("epoch", "step") and "lr-" not in c), (
        cols
    )
