"""A run resumed into its own run dir keeps the training curves it logged before the checkpoint.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when it opens a dir that has one, so a preempted
job re-run with ``ckpt_path=last`` would keep only what it logs after the resume.
:class:`CSVHistory` reads the old rows before the logger opens the file and writes them back;
after training it drops the old rows the resumed run logged again (those from the first step it
logged on), so the file reads as one run.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _step(row: dict) -> int:
    """The row's step; -1 for a row without one (it stays wherever it stands)."""
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return -1


def _read(path: Path) -> tuple[list[str], list[dict]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _write(path: Path, header: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=header)
        out.writeheader()
        out.writerows(rows)


def drop_replayed(rows: list[dict]) -> list[dict]:
    """Where the steps go back (an earlier resume that did not get to clean up), keep the later rows."""
    kept: list[dict] = []
    last = -1
    for r in rows:
        s = _step(r)
        if s >= 0:
            if s < last:
                kept = [k for k in kept if _step(k) < s]
            last = s
        kept.append(r)
    return kept


class CSVHistory:
    """Build after the loggers and before training; call :meth:`finish` after training.
    A no-op unless resuming; rank 0 only (the others do not log)."""

    def __init__(self, loggers, resuming: bool):
        from lightning_fabric.utilities.rank_zero import rank_zero_only
        from pytorch_lightning.loggers import CSVLogger

        self.old: dict[Path, int] = {}  # file -> rows from before the resume
        if not resuming or getattr(rank_zero_only, "rank", 0) != 0:
            return
        for lg in loggers:
            path = Path(lg.log_dir) / "metrics.csv" if isinstance(lg, CSVLogger) else None
            if path is None or not path.is_file():
                continue
            header, rows = _read(path)
            rows = drop_replayed(rows)
            writer = lg.experiment  # opening the writer deletes the old file
            _write(path, header, rows)
            writer.metrics_keys = list(header)  # the resumed run's rows append under this header (or widen it)
            self.old[path] = len(rows)

    def finish(self) -> None:
        for path, n_old in self.old.items():
            if not path.is_file():
                continue
            header, rows = _read(path)
            old, new = rows[:n_old], rows[n_old:]
            steps = [s for s in map(_step, new) if s >= 0]
            if not steps:
                continue
            first = min(steps)
            kept = [r for r in old if _step(r) < first]
            _write(path, header, kept + new)
            log.info(
                "%s: kept %d rows from before the resume (steps < %d), dropped %d it logged again",
                path,
                len(kept),
                first,
                len(old) - len(kept),
            )
