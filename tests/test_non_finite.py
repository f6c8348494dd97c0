"""A non-finite loss or gradient never ends in a normal-looking result (``callbacks.non_finite``).

With ``stage.optim.lr=1e30`` every stage meets NaN / inf within a few steps: the run stops with a
``NonFiniteError`` naming the step and the last finite loss, writes no ``backbone/`` and no
``metrics.json``, and the command line exits non-zero with the traceback at the end of the job's
``train.log``. Under ``action=skip`` a bad step is dropped and counted; too many in a row stop the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_backbones import dm  # noqa: F401  (the debug-size synthetic set)

from unveil.stages.guard import NonFiniteError, NonFiniteGuard

ROOT = Path(__file__).resolve().parents[1]

RL = ["reward=umed", "stage.num_generations=3", "stage.max_new_tokens=12"]
STAGES = {"sft": ["stage=sft"], "grpo": ["stage=grpo", *RL], "ppo": ["stage=ppo", *RL]}


def run_train(tmp_path, *overrides):
    from test_rl_stages import compose

    from unveil.train import train

    base = ["debug=fast", f"paths.output_dir={tmp_path / 'run'}", "data.batch_size=2", "eval.max_new_tokens=8"]
    return train(compose([*base, *overrides]))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_run_that_meets_nan_stops_and_saves_nothing(tmp_path, stage):
    with pytest.raises(NonFiniteError, match=r"(non-finite|not finite).*last finite loss was [-\d.e]+ at step \d"):
        run_train(tmp_path, *STAGES[stage], "stage.optim.lr=1e30", "trainer.max_steps=6")
    out = tmp_path / "run"
    assert not (out / "backbone").exists() and not (out / "metrics.json").exists()


def test_dpo_that_meets_nan_stops(tmp_path, dm):  # noqa: F811
    from test_backbones import compose, dpo_overrides, run_overrides, write_preference_set

    from unveil.train import train

    data = tmp_path / "pref"
    write_preference_set(Path(dm.root), data)
    cfg = compose(
        [
            *dpo_overrides(data),
            *run_overrides(tmp_path),
            "+callbacks.non_finite._target_=unveil.stages.guard.NonFiniteGuard",  # run_overrides drops callbacks
            "stage.optim.lr=1e30",
            "trainer.max_steps=6",
        ]
    )
    with pytest.raises(NonFiniteError, match="last finite loss"):
        train(cfg)
    assert not (tmp_path / "run" / "backbone").exists()


def test_the_command_line_exits_nonzero_and_logs_the_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "unveil.train", "debug=fast", "stage.optim.lr=1e30", "trainer.max_steps=6"]
    res = subprocess.run([*cmd, f"hydra.run.dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode != 0
    assert "NonFiniteError" in res.stderr
    log = (out / "train.log").read_text()
    assert "the run failed" in log and log.rstrip().splitlines()[-1].startswith("unveil.stages.guard.NonFiniteError")
    assert not (out / "metrics.json").exists()


class _Trainer:
    global_step, precision = 7, "32-true"


class _Module:
    def __init__(self):
        self.logged = {}

    def log(self, key, value, **kw):
        self.logged[key] = value


def _step(guard, module, loss: float, grad: float) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), grad)
    opt = torch.optim.SGD([p], lr=0.1)
    guard.on_before_backward(_Trainer(), module, torch.tensor(loss))
    guard.on_before_optimizer_step(_Trainer(), module, opt)
    return p


def test_skip_drops_the_step_counts_it_and_stops_after_n_in_a_row():
    guard, module = NonFiniteGuard(action="skip", max_in_a_row=2), _Module()
    assert _step(guard, module, 1.5, 0.1).grad is not None and guard.last_finite == (7, 1.5)
    p = _step(guard, module, float("nan"), 0.1)
    assert p.grad is None and guard.skipped == 1 and module.logged["train/non_finite_skips"] == 1.0
    assert _step(guard, module, 2.0, 0.1).grad is not None and guard.in_a_row == 0  # a good step resets the run
    assert _step(guard, module, 2.0, float("inf")).grad is None  # a finite loss with an inf gradient
    with pytest.raises(NonFiniteError, match="2 steps in a row.*last finite loss was 2 at step 7"):
        _step(guard, module, float("inf"), 0.1)


def test_raise_names_the_step_and_the_last_finite_loss():
    guard, module = NonFiniteGuard(), _Module()
    _step(guard, module, 0.25, 0.1)
    with pytest.raises(NonFiniteError, match="non-finite gradient norm nan at step 7; the last finite loss was 0.25"):
        _step(guard, module, 0.5, float("nan"))
    with pytest.raises(ValueError, match="raise"):
        NonFiniteGuard(action="ignore")
