"""The text of ``report.md``: the tables of a :class:`~unveil.report.write.Report`, its figures and runs."""

from __future__ import annotations

import math
import os
from pathlib import Path

from unveil.report.collect import shared_overrides
from unveil.report.stats import column
from unveil.report.tables import fmt, fmt_delta, md_table
from unveil.report.write import BREAKDOWNS, TRAINING, Report


def _head(report: Report, command: str | None, title: str | None) -> list[str]:
    n_runs, n_rows = len(report.runs), len(report.groups)
    lines = [f"# {title or 'Report'}", ""]
    if command:
        lines += ["Made by:", "", "```", command, "```", ""]
    lines.append(
        f"{n_runs} runs in {n_rows} rows. A row is the runs whose overrides (`.hydra/overrides.yaml`) are the "
        "same apart from `seed`: its cells are the mean ± std over those runs (std from two runs on)."
    )
    shared = shared_overrides(report.runs)
    if shared:
        lines += ["", "Every run has: " + ", ".join(f"`{k}={v}`" for k, v in shared.items()) + "."]
    return lines + [""]


def _metric_table(report: Report) -> list[str]:
    p = report.prefix
    rows = []
    for i, g in enumerate(report.groups):
        seeds = " ".join(str(s) for s in g.seeds if s is not None)
        rows.append([i, g.label, len(g.runs), seeds] + [fmt(*g.stat(f"{p}/{m}")) for m in report.metrics])
    return [f"## Test metrics (`{p}/<metric>` of each run's `metrics.json`)", ""] + md_table(
        ["row", "overrides", "runs", "seeds", *report.metrics], rows
    )


def _delta_table(report: Report) -> list[str]:
    if not report.deltas or len(report.groups) < 2:
        return []
    b = report.baseline
    n = max((d.n_studies for d in report.deltas.values()), default=0)
    rows = [
        [i, g.label] + [fmt_delta(report.deltas.get((i, m))) for m in report.metrics]
        for i, g in enumerate(report.groups)
        if i != b
    ]
    text = (
        f"Each row minus row {b} (`{report.groups[b].label}`), with a paired bootstrap 95% interval: "
        f"{report.n_boot} resamples of the {n} test studies (the records of one image), the same draw for "
        "every run, each row the mean over its runs (`predictions.jsonl`). An interval that excludes 0 is a "
        "difference the test set resolves; it does not include the spread between seeds (the std above)."
    )
    return ["", f"## Difference to row {b}", "", text, ""] + md_table(["row", "overrides", *report.metrics], rows)


def _breakdown_tables(report: Report) -> list[str]:
    lines = []
    for kind in BREAKDOWNS:
        metric, values = report.breakdown(kind)
        if not values:
            continue
        cols = [*values, "average"]
        rows = [
            [i, g.label] + [fmt(*g.stat(column(kind, metric, values, c, report.prefix))) for c in cols]
            for i, g in enumerate(report.groups)
        ]
        lines += ["", f"## `{metric}` per {kind}", "", f"`average`: the mean over the {kind} values of each run, "]
        lines[-1] += "then mean ± std over the row's runs."
        lines += [""] + md_table(["row", "overrides", *cols], rows)
    return lines


def _training_table(report: Report) -> list[str]:
    keys = [k for k in TRAINING if any(k in r.run.metrics for r in report.runs)]
    heads = sorted(
        {k for r in report.runs for k in r.run.metrics if k.startswith("train/rewards/") and k.endswith("/mean")}
    )
    keys += heads
    if not keys:
        return []
    rows = [[i, g.label] + [fmt(*g.stat(k)) for k in keys] for i, g in enumerate(report.groups)]
    return ["", "## Last logged training metrics", ""] + md_table(["row", "overrides", *keys], rows)


def _figures(paths: dict[str, Path], out: Path) -> list[str]:
    names = {
        "bars": "Test metrics per row (bar: mean, whisker: std, dots: runs)",
        "delta": "Difference to the baseline row, with its 95% interval",
        "modality": "Per modality",
        "ability": "Per ability",
        "curves": "Training curves (mean over each row's runs)",
    }
    lines = []
    for k, title in names.items():
        if k in paths:
            lines += ["", f"### {title}", "", f"![{k}]({os.path.relpath(paths[k], out)})"]
    return ["", "## Figures", *lines] if lines else []


def _runs_table(report: Report, out: Path) -> list[str]:
    p = report.prefix
    rows = []
    for i, g in enumerate(report.groups):
        for r in g.runs:
            rel = os.path.relpath(r.path.resolve(), out.resolve())
            v = r.value(f"{p}/{report.primary}")
            rows.append([f"`{rel}`", i, r.seed if r.seed is not None else "", fmt(v) if math.isfinite(v) else "n/a"])
    return ["", "## Runs", ""] + md_table(["run (relative to this file)", "row", "seed", report.primary], rows)


def report_markdown(
    report: Report, paths: dict[str, Path], out: Path, command: str | None = None, title: str | None = None, reading=""
) -> str:
    lines = _head(report, command, title) + _metric_table(report) + _delta_table(report)
    lines += _breakdown_tables(report) + _training_table(report) + _figures(paths, out) + _runs_table(report, out)
    lines += ["", "## Reading", ""] + ([reading, ""] if reading else [])
    return "\n".join(lines)
