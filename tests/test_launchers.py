"""The sweep presets run: ``hydra/launcher=submitit_local | local_parallel``, ``hparams_search=umed_rewards_optuna``,
and ``hydra/launcher=slurm`` composes (no SLURM here: its resolved settings and the job side are checked).

The runs are debug-size (2 training steps, a handful of eval samples) and share one synthetic set.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

TINY = [
    "debug=fast",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "model.vision_pretrain.steps=1",
    "data.max_samples.val=4",
    "data.max_samples.test=4",
    "eval.max_new_tokens=8",
]
RL = ["stage=grpo", "reward=umed", "stage.num_generations=2", "stage.max_new_tokens=8"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> list[str]:
    """One data and cache dir for every run of this file (the first job generates the set, under a lock)."""
    d = tmp_path_factory.mktemp("shared")
    return [f"paths.data_dir={d / 'data'}", f"paths.cache_dir={d / 'cache'}"]


def run_train(*args: str, env_drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    for k in env_drop:
        env.pop(k, None)
    cmd = [sys.executable, "-m", "unveil.train", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.mark.slow
def test_a_submitit_local_multirun_finishes_both_jobs(tmp_path, shared):
    sweep = tmp_path / "sweep"
    run_train("-m", "hydra/launcher=submitit_local", *TINY, *shared, "seed=0,1", f"hydra.sweep.dir={sweep}")
    for job in ("0", "1"):
        m = json.loads((sweep / job / "metrics.json").read_text())
        assert "test/presence_acc" in m and "train/loss" in m
    assert any((sweep / ".submitit").iterdir())  # the jobs ran as submitit jobs, not in this process


def _trials(db: Path) -> list[tuple[int, str, float | None]]:
    with sqlite3.connect(db) as c:
        return c.execute(
            "SELECT t.number, t.state, v.value FROM trials t LEFT JOIN trial_values v ON v.trial_id = t.trial_id "
            "ORDER BY t.number"
        ).fetchall()


def _params(db: Path) -> list[dict[str, float]]:
    with sqlite3.connect(db) as c:
        rows = c.execute(
            "SELECT t.number, p.param_name, p.param_value FROM trial_params p JOIN trials t ON t.trial_id = p.trial_id"
        ).fetchall()
    out: dict[int, dict[str, float]] = {}
    for n, name, value in rows:
        out.setdefault(n, {})[name] = value
    return [out[n] for n in sorted(out)]


@pytest.mark.slow
def test_an_optuna_search_finishes_and_a_rerun_continues_the_same_study(tmp_path, shared):
    logs = tmp_path / "logs"
    # train/loss: a metric that differs between trials at debug size (test/iou is 0 after 2 steps)
    args = ["hparams_search=umed_rewards_optuna", *TINY, *RL, *shared, f"paths.log_dir={logs}"]
    args += ["hydra.sweeper.n_trials=3", "optimized_metric=train/loss"]
    run_train(*args)
    study = logs / "optuna" / "umed_rewards"
    db = study / "optuna.db"
    first = _trials(db)
    assert [(n, s) for n, s, _ in first] == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]
    (sweep1,) = [p for p in study.iterdir() if p.is_dir()]
    for n, _, value in first:  # the value the sweeper stored is optimized_metric of that trial's run
        assert value == pytest.approx(json.loads((sweep1 / str(n) / "metrics.json").read_text())["train/loss"])
    run_train(*args)
    trials = _trials(db)
    assert [(n, s) for n, s, _ in trials] == [(n, "COMPLETE") for n in range(6)] and trials[:3] == first
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT COUNT(*) FROM studies").fetchone() == (1,)
    params = _params(db)
    assert set(params[0]) == {
        "reward.relevance.weight",
        "reward.localization.weight",
        "reward.vision_relevance.weight",
        "stage.optim.lr",
    }
    assert all(p not in params[:3] for p in params[3:])  # the re-run's sampler does not repeat the first run
    sweeps = sorted(p for p in study.iterdir() if p.is_dir())
    assert len(sweeps) == 2 and all((s / str(k) / "metrics.json").is_file() for s in sweeps for k in range(3))


@pytest.mark.slow
def test_local_parallel_gives_each_job_its_share_of_the_cores(tmp_path, shared):
    import joblib

    sweep = tmp_path / "sweep"
    # no OMP_NUM_THREADS from outside: each job's thread count is the launcher's doing
    run_train(
        "-m", "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2", *TINY, *shared, "seed=0,1",
        f"hydra.sweep.dir={sweep}", env_drop=("OMP_NUM_THREADS",),
    )  # fmt: skip
    share = max(1, joblib.cpu_count() // 2)
    for job in ("0", "1"):
        assert (sweep / job / "metrics.json").is_file()
        assert f"torch threads: {share} (OMP_NUM_THREADS={share})" in (sweep / job / "train.log").read_text()


def test_num_threads_sets_the_jobs_torch_threads():
    import torch

    from unveil.utils.cluster import apply_num_threads

    before = torch.get_num_threads()
    try:
        assert apply_num_threads(2) == 2 == torch.get_num_threads()
        assert apply_num_threads(None) == 2  # null leaves torch's count as it is
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="num_threads=-1"):
        apply_num_threads(-1)


def _compose_with_hydra(overrides):
    from hydra import compose, initialize_config_dir

    import unveil.utils.resolvers  # noqa: F401

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_the_slurm_preset_asks_one_task_per_gpu_on_each_node():
    cfg = _compose_with_hydra(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0  # timeouts are requeued, with warning
    with pytest.raises(Exception, match=r"trainer.devices=-1.*number of GPUs per node"):
        _ = _compose_with_hydra(["hydra/launcher=slurm", "trainer=ddp"]).hydra.launcher.tasks_per_node


def test_a_submitit_slurm_job_gets_lightnings_slurm_environment_without_its_requeue(monkeypatch, caplog):
    from lightning_fabric.plugins.environments import SLURMEnvironment
    from omegaconf import OmegaConf

    from unveil.utils.cluster import trainer_plugins

    trainer_cfg = OmegaConf.create({"devices": 1})
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert trainer_plugins(trainer_cfg, None) == {}  # not under SLURM: nothing changes
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    with caplog.at_level(logging.WARNING, logger="unveil.utils.cluster"):
        (env,) = trainer_plugins(trainer_cfg, None)["plugins"]
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False  # submitit requeues, once
    assert "without ckpt_path=last" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unveil.utils.cluster"):
        trainer_plugins(trainer_cfg, "last")
    assert caplog.text == ""
    assert trainer_plugins(OmegaConf.create({"plugins": ["mine"]}), "last") == {}  # the user's own plugins stay


def test_the_study_seed_moves_on_by_the_trials_stored(tmp_path):
    from unveil.utils.cluster import study_seed, study_storage

    db = tmp_path / "new" / "optuna.db"
    assert study_storage(str(db)) == f"sqlite:///{db}" and db.parent.is_dir()
    assert study_seed(1234, str(db)) == 1234  # no study yet
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE trials (trial_id INTEGER)")
        c.executemany("INSERT INTO trials VALUES (?)", [(1,), (2,), (3,)])
    assert study_seed(1234, str(db)) == 1237
