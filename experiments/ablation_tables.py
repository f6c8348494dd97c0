"""Table helpers shared by the ablation scripts: number cells, the CSV, and the hand-written
"Reading" section that survives re-collection."""

from __future__ import annotations

import csv
import math
from pathlib import Path


def fmt(m: float, s: float = math.nan) -> str:
    """``0.650`` or ``0.646 ± 0.001``; ``n/a`` for a missing value."""
    if not math.isfinite(m):
        return "n/a"
    return f"{m:.3f}" if not math.isfinite(s) else f"{m:.3f} ± {s:.3f}"


def existing_reading(md: Path) -> str:
    """The text under ``## Reading`` of an earlier table, so a person's reading is kept."""
    if not md.exists():
        return ""
    text = md.read_text()
    marker = "\n## Reading\n"
    return text.split(marker, 1)[1].strip() if marker in text else ""


def write_csv(rows: list[dict], fields: list[str], path: Path) -> None:
    """One row per dict; NaN and missing cells are written empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(
                {k: ("" if isinstance(r.get(k), float) and not math.isfinite(r[k]) else r.get(k, "")) for k in fields}
            )
