"""Table cells, Markdown tables and CSV files of a report (and of the ablation scripts' tables)."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

# a decimal as the tables write them (0.714, -0.004); integers (steps, seeds, counts) are not checked
NUMBER = re.compile(r"(?<![\w.])[-\u2212]?\d+\.\d+")


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


def stale_numbers(reading: str, generated: str) -> list[str]:
    """The decimals ``reading`` quotes that ``generated`` (the regenerated part of the file) does not
    write: what a kept reading would carry over stale. A sign-less match counts (a reading may say
    "falls by 0.004" of a table's -0.004)."""
    have = {n.replace("\u2212", "-").lstrip("-") for n in NUMBER.findall(generated)}
    return [n for n in NUMBER.findall(reading) if n.replace("\u2212", "-").lstrip("-") not in have]


def reading_lines(reading: str, generated: str) -> list[str]:
    """The ``## Reading`` section: the kept text, headed by a warning when it quotes numbers the new
    tables no longer hold (so a regenerated table never carries stale prose silently)."""
    lines = ["## Reading", ""]
    if not reading:
        return lines
    stale = stale_numbers(reading, generated)
    if stale:
        print(f"warning: the kept reading quotes numbers the new tables do not hold: {sorted(set(stale))}")
        lines += [
            "> **Stale:** this reading was written for other tables: it quotes "
            + ", ".join(sorted(set(stale)))
            + ", which the tables above do not hold. Rewrite it against them.",
            "",
        ]
    return lines + [reading, ""]
