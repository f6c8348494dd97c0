"""Build a report from runs and write ``report.md``, ``report.csv`` and the figures."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from unveil.eval.runs import TABLE_METRICS
from unveil.report import figures
from unveil.report.collect import FOLD, Group, ReportRun, find_runs, group_runs, select_group
from unveil.report.stats import Delta, breakdown_values, column, paired_bootstrap
from unveil.report.tables import existing_reading, write_csv

BREAKDOWNS = ("modality", "ability")
TRAINING = ("train/loss", "val/loss", "train/reward", "val/reward", "train/kl", "train/rewards/margins")


@dataclass
class Report:
    """Groups of runs, the baseline row, the table metrics and each row's difference to the baseline."""

    groups: list[Group]
    baseline: int
    metrics: list[str]
    primary: str
    deltas: dict[tuple[int, str], Delta] = field(default_factory=dict)
    n_boot: int = 2000
    prefix: str = "test"

    @property
    def runs(self) -> list[ReportRun]:
        return [r for g in self.groups for r in g.runs]

    def breakdown(self, kind: str) -> tuple[str, list[str]]:
        """(metric, values) of a breakdown: the primary metric where the runs report it per value,
        else the first table metric they do (``mcq_acc`` per ability)."""
        for m in dict.fromkeys([self.primary, *self.metrics, *TABLE_METRICS]):
            values = sorted({v for r in self.runs for v in breakdown_values(r, kind, m, self.prefix)})
            if values:
                return m, values
        return self.primary, []


def present_metrics(runs: list[ReportRun], prefix: str = "test") -> list[str]:
    """The table metrics (:data:`unveil.eval.runs.TABLE_METRICS`) some run has a value for."""
    return [m for m in TABLE_METRICS if any(math.isfinite(r.value(f"{prefix}/{m}")) for r in runs)]


def build_report(
    sources: Iterable[str | Path] | list[ReportRun],
    baseline: str | int | None = None,
    metrics: list[str] | None = None,
    primary: str | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    fold: Iterable[str] = FOLD,
) -> Report:
    """Runs (or the dirs to find them under), grouped, with their deltas to ``baseline``
    (:func:`unveil.report.collect.select_group`; default the first row)."""
    sources = list(sources)
    runs = sources if sources and isinstance(sources[0], ReportRun) else find_runs(sources)
    if not runs:
        raise ValueError("no runs to report on")
    groups = group_runs(runs, fold)
    metrics = list(metrics or present_metrics(runs)) or ["iou"]
    primary = primary or ("iou" if "iou" in metrics else metrics[0])
    b = select_group(groups, baseline)
    report = Report(groups, b, metrics, primary, n_boot=n_boot)
    report.deltas = paired_bootstrap(groups, b, metrics, n_boot=n_boot, seed=seed) if n_boot > 0 else {}
    return report


def csv_rows(report: Report) -> tuple[list[dict], list[str]]:
    """One row per group: its differing overrides, every test metric (and per-breakdown average)
    as mean and std over its runs, the final training metrics, and the deltas with their intervals."""
    p = report.prefix
    keys = list(report.groups[0].key)
    tests = sorted({k for r in report.runs for k in r.run.metrics if k.startswith(p + "/")})
    averages = [(kind, m) for kind in BREAKDOWNS for m in report.metrics if report_values(report, kind, m)]
    training = [k for k in TRAINING if any(k in r.run.metrics for r in report.runs)]
    rows = []
    for i, g in enumerate(report.groups):
        row = {"row": i, "label": g.label, **{k: g.key[k] or "" for k in keys}}
        row.update(n_runs=len(g.runs), seeds=" ".join(str(s) for s in g.seeds), baseline=int(i == report.baseline))
        for k in tests + training:
            name = k.removeprefix(p + "/")
            row[f"{name}/mean"], row[f"{name}/std"] = g.stat(k)
        for kind, m in averages:
            vals = report_values(report, kind, m)
            row[f"{kind}/average/{m}/mean"], row[f"{kind}/average/{m}/std"] = g.stat(
                column(kind, m, vals, "average", p)
            )
        for m in report.metrics:
            d = report.deltas.get((i, m)) or Delta(math.nan)
            row[f"{m}/delta"], row[f"{m}/delta_lo"], row[f"{m}/delta_hi"] = d.diff, d.lo, d.hi
        rows.append(row)
    fields = list(rows[0])
    return rows, fields


def report_values(report: Report, kind: str, metric: str) -> list[str]:
    return sorted({v for r in report.runs for v in breakdown_values(r, kind, metric, report.prefix)})


def write_figures(report: Report, out: Path) -> dict[str, Path]:
    """bars.png, delta.png, <kind>.png per breakdown, curves.png: the ones there is data for."""
    shown = list(dict.fromkeys([report.primary, *report.metrics]))[:4]  # four panels at most
    paths = {"bars": figures.save(figures.bar_chart(report.groups, shown, report.prefix), out / "bars.png")}
    if report.deltas and len(report.groups) > 1:
        fig = figures.delta_chart(report.groups, report.deltas, shown, report.baseline)
        paths["delta"] = figures.save(fig, out / "delta.png")
    for kind in BREAKDOWNS:
        metric, values = report.breakdown(kind)
        fig = figures.breakdown_chart(report.groups, kind, metric, report.prefix) if values else None
        if fig is not None:
            paths[kind] = figures.save(fig, out / f"{kind}.png")
    fig = figures.curves_chart(report.groups)
    if fig is not None:
        paths["curves"] = figures.save(fig, out / "curves.png")
    return paths


def write_report(
    report: Report, out: str | Path, command: str | None = None, title: str | None = None, figures_on: bool = True
) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv`` and the figures into ``out``; returns their paths by name
    (``md``, ``csv``, ``bars``, ``delta``, ``modality``, ``ability``, ``curves``). A ``## Reading``
    section already in ``out/report.md`` is kept."""
    from unveil.report.markdown import report_markdown

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, fields = csv_rows(report)
    write_csv(rows, fields, out / "report.csv")
    paths = write_figures(report, out) if figures_on else {}
    md = out / "report.md"
    reading = existing_reading(md)
    md.write_text(report_markdown(report, paths, out, command=command, title=title, reading=reading), encoding="utf-8")
    return {"md": md, "csv": out / "report.csv", **paths}


def common_root(runs: list[ReportRun]) -> Path:
    """The deepest folder holding every run (where the report goes by default)."""
    paths = [str(r.path.resolve()) for r in runs]
    return Path(os.path.commonpath(paths)) if len(paths) > 1 else Path(paths[0]).parent
