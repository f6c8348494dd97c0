"""wandb as a sweep expects it: one group per sweep, one finished run per job, resumes on the same run.

- **Group and job type.** ``conf/logger/wandb.yaml`` names the group after the sweep dir
  (:func:`sweep_group`, ``<parent>/<name>`` of ``hydra.sweep.dir``; none for a single run), the job
  type after the stage (``sft``, ``grpo``, ...) and the run after the job (``train#3``).
- **A finished run per job.** Lightning's ``WandbLogger`` never calls ``wandb.finish``, and reuses a
  run still open in the process: without :func:`finish_runs` every job of a multirun in one process
  (the basic launcher, joblib's reused workers) would log into the first job's run. ``train()`` finishes
  its runs at the end of each job, with exit code 1 when the job failed.
- **The report.** :func:`log_report_to_wandb` logs a sweep report's figures and tables to the
  sweep's group, as one more run of job type ``report``.
- **Resume.** Without an ``id``, every ``WandbLogger`` starts a new wandb run, so a preempted job re-run with
``ckpt_path=last`` would split its curves in two. wandb keeps the last run it made under
``<save_dir>/wandb/latest-run`` (``run-<time>-<id>``, or ``offline-run-...`` offline): resuming,
we pass that id with ``resume="allow"``.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

_RUN_DIR = re.compile(r"^(?:offline-)?run-\d{8}_\d{6}-([A-Za-z0-9]+)$")


def previous_run_id(save_dir: str | Path) -> str | None:
    """The id of the wandb run last made under ``save_dir``, or None."""
    latest = Path(save_dir) / "wandb" / "latest-run"
    if not latest.exists():
        return None
    m = _RUN_DIR.match(os.path.basename(os.path.realpath(latest)))
    return m.group(1) if m else None


def resume_kwargs(logger_cfg, resuming: bool) -> dict:
    """Extra WandbLogger arguments for a resumed run (none when the config names an id itself)."""
    if not resuming or not str(logger_cfg.get("_target_", "")).endswith("WandbLogger") or logger_cfg.get("id"):
        return {}
    run_id = previous_run_id(logger_cfg.get("save_dir") or ".")
    return {"id": run_id, "resume": "allow"} if run_id else {}


def group_of(sweep_dir: str | Path) -> str:
    """The wandb group of a sweep dir: ``<parent>/<name>`` (``multiruns/2026-12-04_10-00-00-000000``,
    ``umed_rewards/<time>``), the same for its jobs and for a report made from it later."""
    p = Path(sweep_dir).resolve()
    return f"{p.parent.name}/{p.name}"


def _hydra_job():
    """The running job's Hydra config when it is one job of a multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return hc if hc.mode == RunMode.MULTIRUN else None


def sweep_group() -> str | None:
    """``${unveil.wandb_group:}``: the group of this job's sweep, None outside a multirun."""
    hc = _hydra_job()
    return group_of(hc.sweep.dir) if hc is not None else None


def job_name(task_name: str) -> str:
    """``${unveil.wandb_name:${task_name}}``: the task name, and in a multirun ``<task>#<job num>``. (What
    differs between the jobs is in each run's config; Hydra's override_dirname holds every override of
    the command line, paths and all.)"""
    hc = _hydra_job()
    return str(task_name) if hc is None else f"{task_name}#{hc.job.num}"


def finish_runs(loggers: Iterable, failed: bool) -> None:
    """``wandb.finish`` for every ``WandbLogger`` of this job whose run has started (exit code 1 on failure),
    so the run is marked finished / failed now and the next job in this process starts its own."""
    from pytorch_lightning.loggers import WandbLogger

    for lg in loggers:
        run = getattr(lg, "_experiment", None) if isinstance(lg, WandbLogger) else None
        if run is None or not callable(getattr(run, "finish", None)):
            continue  # not wandb, a run never started, or a non-zero rank's stand-in
        run.finish(exit_code=1 if failed else 0)
        lg._experiment = None


def _csv_table(path: Path):
    import wandb

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return None

    def cell(v: str):
        try:
            return float(v)
        except ValueError:
            return v

    return wandb.Table(columns=rows[0], data=[[cell(v) for v in r] for r in rows[1:]])


def log_report_to_wandb(
    paths: Iterable[str | Path], group: str, project: str = "unveil", save_dir: str | Path | None = None
) -> str:
    """Log a report's files to a sweep's wandb group as one finished run of job type ``report``; return its id.

    ``*.png`` go in as images and ``*.csv`` as tables, each under its file name; every file (``*.md``
    too) is also saved with the run. ``group`` is the sweep's group, ``group_of(<sweep dir>)``.
    Offline unless ``WANDB_API_KEY`` is set, like ``logger=wandb``; ``save_dir`` holds the ``wandb/``
    folder (default: the folder of the first file)."""
    import wandb

    files = [Path(p) for p in paths]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"log_report_to_wandb: no such file(s): {', '.join(missing)}")
    save_dir = Path(save_dir or (files[0].parent if files else "."))
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    run = wandb.init(
        project=project, group=group, job_type="report", name=f"report {group}"[:128], dir=str(save_dir),
        mode=mode, reinit="create_new",
    )  # fmt: skip
    try:
        logs = {}
        for p in files:
            if p.suffix == ".png":
                logs[p.stem] = wandb.Image(str(p))
            elif p.suffix == ".csv" and (table := _csv_table(p)) is not None:
                logs[p.stem] = table
            run.save(str(p.resolve()), base_path=str(p.resolve().parent), policy="now")
        if logs:
            run.log(logs)
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish(exit_code=0)
    log.info("report logged to wandb group %s (run %s)", group, run.id)
    return run.id
