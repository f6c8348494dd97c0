"""Two-process DDP on the CPU (gloo): an RL run with dynamic sampling trains, validates and is
evaluated without a collective mismatch. Each rank logs its own per-head validation stats; only
synced values (``val/loss``) must be logged by every rank, and rank 0 alone scores the test split."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_grpo_with_dynamic_sampling_under_two_process_ddp(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "unveil.train", "debug=fast", "stage=grpo", "reward=umed", "stage.fill_batch=true",
           "trainer.max_steps=3", "trainer.accelerator=cpu", "trainer.devices=2", "+trainer.strategy=ddp",
           "data.max_samples.test=8", "stage.max_new_tokens=12", f"hydra.run.dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert "test/presence_acc" in metrics and "val/loss" in metrics
    assert 0 <= metrics["train/kept_frac"] <= 1


def test_dpo_under_two_process_ddp(tmp_path, synthetic_dir):
    """DPO logs a fixed key set on every rank (margins, accuracies, weights), so it should sync
    cleanly; this checks it, and that rank 0's test evaluation does not wait for rank 1."""
    from test_dpo import _write_preference_set

    data, out = tmp_path / "pref", tmp_path / "run"
    _write_preference_set(synthetic_dir, data)
    cmd = [sys.executable, "-m", "unveil.train", "debug=fast", "stage=dpo", "stage.weight_norm=mmedpo", "data=mau_jsonl",
           f"data.root={data}", "data.synthetic=null", "data.num_workers=0", "data.batch_size=2", "trainer.max_steps=3",
           "trainer.val_check_interval=3", "trainer.accelerator=cpu", "trainer.devices=2", "+trainer.strategy=ddp",
           "data.max_samples.test=8", f"hydra.run.dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert "test/presence_acc" in metrics and "val/rewards/margins" in metrics
