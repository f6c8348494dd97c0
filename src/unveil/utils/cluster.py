"""What a training job does differently when a launcher runs it: its thread budget, and SLURM.

- ``hydra/launcher=local_parallel`` runs ``n_jobs`` jobs side by side in joblib workers; joblib sets
  ``OMP_NUM_THREADS = cores // n_jobs`` in each worker, which torch reads when it starts. Two jobs on
  2 cores that each take 2 torch threads thrash (one SFT step went from 0.09 s to 3.3 s).
  ``num_threads`` in the config overrides the share.
- ``hydra/launcher=slurm`` runs each job under submitit: submitit, not Lightning, requeues a job that
  times out or is preempted (SIGUSR2 -> pickled job -> ``scontrol requeue``). Lightning's own SLURM
  requeue would requeue it a second time, so its ``SLURMEnvironment`` (ranks from ``srun``) is
  given with ``auto_requeue=False``. The requeued job resumes only with ``ckpt_path=last``.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)


def apply_num_threads(num_threads: int | None) -> int:
    """Set torch's intra-op threads when ``num_threads`` is given; return the count this job runs with."""
    import torch

    if num_threads:
        if int(num_threads) < 1:
            raise ValueError(f"num_threads={num_threads}: expected a positive number of threads, or null")
        torch.set_num_threads(int(num_threads))
    n = torch.get_num_threads()
    log.info("torch threads: %d (OMP_NUM_THREADS=%s)", n, os.environ.get("OMP_NUM_THREADS", "unset"))
    return n


def under_submitit_slurm() -> bool:
    """True inside a job that hydra-submitit-launcher submitted to SLURM (submitit exports this)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def trainer_plugins(trainer_cfg, ckpt_path) -> dict:
    """Extra ``Trainer`` arguments for the cluster this job runs on (none outside submitit's SLURM jobs)."""
    if not under_submitit_slurm() or trainer_cfg.get("plugins"):
        return {}
    from lightning_fabric.plugins.environments import SLURMEnvironment

    if str(ckpt_path) != "last":
        log.warning(
            "a SLURM job of hydra/launcher=slurm without ckpt_path=last: if it is preempted or times out, "
            "submitit requeues it and it starts over instead of resuming from its last.ckpt"
        )
    return {"plugins": [SLURMEnvironment(auto_requeue=False)]}


def devices_per_node(devices) -> int:
    """``${unveil.devices_per_node:${trainer.devices}}``: the tasks (= GPUs) per node of a SLURM job.

    Lightning's SLURM environment takes one process per ``srun`` task and checks that there are
    ``trainer.devices x trainer.num_nodes`` of them, so the count must be a number, not -1 or auto."""
    try:
        n = int(devices)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ValueError(
            f"hydra/launcher=slurm: trainer.devices={devices!r}, but a SLURM job needs the number of GPUs per "
            "node (one srun task each), e.g. trainer.devices=4"
        )
    return n


def study_storage(db_path: str) -> str:
    """``${unveil.study_storage:<path>}``: the sqlite URL of an Optuna study file, its folder made."""
    path = Path(db_path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def study_seed(seed, db_path: str) -> int:
    """``${unveil.study_seed:<seed>,<db path>}``: the sampler seed plus the trials already stored.

    A seeded sampler restarts its random stream in every process, so a re-run resuming the study with
    the same seed would propose the first run's parameters again; shifting the seed by the number of
    stored trials keeps a re-run reproducible and new."""
    path = Path(db_path)
    if not path.is_file():
        return int(seed)
    with sqlite3.connect(path) as db:
        try:
            (n,) = db.execute("SELECT COUNT(*) FROM trials").fetchone()
        except sqlite3.OperationalError:  # the file exists but the study tables do not yet
            n = 0
    return int(seed) + int(n)
