"""Table cells, Markdown tables and CSV files of a report (and of the ablation scripts' tables)."""

from __future__ import annotations

import csv
import math
from pathlib import Path


def fmt(m: float, s: float = math.nan) -> str:
    """``0.650`` or ``0.646 ± 0.001``; ``n/a`` for a missing value."""
    if m is None or not math.isfinite(m):
        return "n/a"
    return f"{m:.3f}" if s is None or not math.isfinite(s) else f"{m:.3f} ± {s:.3f}"


def fmt_delta(d) -> str:
    """``+0.012 [-0.003, +0.027]`` for a :class:`~unveil.report.stats.Delta`; its reason when it has none."""
    if d is None:
        return ""
    if not math.isfinite(d.diff):
        return f"n/a ({d.reason})" if d.reason else "n/a"
    if not (math.isfinite(d.lo) and math.isfinite(d.hi)):
        return f"{d.diff:+.3f}"
    return f"{d.diff:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a Markdown table (``|---|`` separators, as GitHub renders them)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


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
