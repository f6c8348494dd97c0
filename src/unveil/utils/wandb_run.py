"""A run resumed into its own run dir goes on logging to the same wandb run.

Without an ``id``, every ``WandbLogger`` starts a new wandb run, so a preempted job re-run with
``ckpt_path=last`` would split its curves in two. wandb keeps the last run it made under
``<save_dir>/wandb/latest-run`` (``run-<time>-<id>``, or ``offline-run-...`` offline): resuming,
we pass that id with ``resume="allow"``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

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
