"""Small helpers for run outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON has no NaN
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


def write_metrics(path: str | Path, metrics: dict) -> None:
    Path(path).write_text(json.dumps({k: _clean(v) for k, v in sorted(metrics.items())}, indent=2) + "\n")


def read_metrics(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
