"""The report's figures (PNG, matplotlib's Agg canvas: no display, no pyplot state).

Each function draws one figure from groups of runs and returns the ``Figure``; ``save`` writes it.
Notebooks call the same functions (``png(fig)`` gives bytes for ``IPython.display.Image``).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from unveil.eval.runs import metric_name
from unveil.report.collect import Group, ReportRun
from unveil.report.stats import Delta, breakdown_values, column


def _figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def row_label(i: int, g: Group, width: int = 48) -> str:
    text = g.label if len(g.label) <= width else g.label[: width - 1] + "…"
    return f"{i}: {text}"


def bar_chart(groups: list[Group], metrics: list[str], prefix: str = "test") -> Figure:
    """One panel per metric: a bar per group (mean over its runs), std as the error bar, each run a dot."""
    fig = _figure(4.2 * len(metrics), 0.45 * len(groups) + 1.4)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    y = np.arange(len(groups))
    for ax, m in zip(axes, metrics):
        stats = [g.stat(f"{prefix}/{m}") for g in groups]
        means = [s[0] for s in stats]
        errs = [s[1] if math.isfinite(s[1]) else 0.0 for s in stats]
        ax.barh(y, np.nan_to_num(means), xerr=errs, color="#7aa6c2", ecolor="black", capsize=3)
        for i, g in enumerate(groups):
            vals = [v for v in g.values(f"{prefix}/{m}") if math.isfinite(v)]
            ax.plot(vals, [i] * len(vals), "k.", ms=4)
        ax.set_title(m)
        ax.set_yticks(y, [row_label(i, g) for i, g in enumerate(groups)] if ax is axes[0] else [])
        ax.invert_yaxis()
    return fig


def breakdown_chart(groups: list[Group], kind: str, metric: str, prefix: str = "test") -> Figure | None:
    """``metric`` per value of a breakdown (``modality``, ``ability``): grouped bars, one per group,
    std over its runs as the error bar. None when no run reports the breakdown."""
    values = sorted({v for g in groups for r in g.runs for v in breakdown_values(r, kind, metric, prefix)})
    if not values:
        return None
    fig = _figure(max(5.0, 1.3 * len(values) + 2.5), 3.6)
    ax = fig.subplots()
    width = 0.8 / len(groups)
    x = np.arange(len(values))
    for i, g in enumerate(groups):
        stats = [g.stat(column(kind, metric, values, v, prefix)) for v in values]
        errs = [s[1] if math.isfinite(s[1]) else 0.0 for s in stats]
        means = np.nan_to_num([s[0] for s in stats])
        ax.bar(x + i * width, means, width, yerr=errs, capsize=2, color=f"C{i}", label=row_label(i, g))
    ax.set_xticks(x + 0.4 - width / 2, values)
    ax.set_ylabel(f"{metric} ({kind})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def delta_chart(
    groups: list[Group], deltas: dict[tuple[int, str], Delta], metrics: list[str], baseline: int
) -> Figure:
    """Each row's difference to the baseline with its paired-bootstrap 95% interval, a panel per metric."""
    rows = [i for i in range(len(groups)) if i != baseline]
    fig = _figure(4.2 * len(metrics), 0.45 * max(len(rows), 1) + 1.6)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, m in zip(axes, metrics):
        for k, i in enumerate(rows):
            d = deltas.get((i, m))
            if d is None or not math.isfinite(d.diff):
                continue
            lo, hi = (d.lo, d.hi) if math.isfinite(d.lo) else (d.diff, d.diff)
            ax.errorbar([d.diff], [k], xerr=[[d.diff - lo], [hi - d.diff]], fmt="o", color="#c0392b", capsize=3)
        ax.axvline(0.0, color="grey", lw=1)
        ax.set_title(f"Δ {m} vs row {baseline}")
        ax.set_yticks(range(len(rows)), [row_label(i, groups[i]) for i in rows] if ax is axes[0] else [])
        ax.set_ylim(len(rows) - 0.5, -0.5)
    return fig


def read_curves(run: ReportRun) -> dict[str, tuple[list[float], list[float]]]:
    """``csv/metrics.csv`` as {metric (current name): (steps, values)}, empty cells skipped."""
    f = run.path / "csv" / "metrics.csv"
    out: dict[str, tuple[list[float], list[float]]] = {}
    if not f.exists():
        return out
    with open(f, encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            step = row.get("step")
            if not step:
                continue
            for k, v in row.items():
                if k in ("step", "epoch") or v in ("", None):
                    continue
                steps, vals = out.setdefault(metric_name(k), ([], []))
                steps.append(float(step))
                vals.append(float(v))
    return out


def curve_panels(curves: list[dict]) -> list[str]:
    """What to plot: each reward head's mean, the total reward and the KL (RL), DPO's margins and
    accuracies, then the training loss."""
    names = {k for c in curves for k in c}
    heads = sorted(k for k in names if k.startswith("train/rewards/") and k.endswith("/mean"))
    extra = ["train/reward", "train/kl", "train/rewards/margins", "train/rewards/accuracies", "train/loss"]
    return heads + [k for k in extra if k in names]


def curves_chart(groups: list[Group]) -> Figure | None:
    """Training curves from each run's ``csv/metrics.csv``: a panel per :func:`curve_panels` metric,
    a line per group (the mean over its runs at each step). None when no run has curves."""
    curves = {id(r): read_curves(r) for g in groups for r in g.runs}
    panels = curve_panels(list(curves.values()))
    if not panels:
        return None
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = _figure(4.2 * cols, 2.9 * nrows + 0.4 * len(groups) / cols)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, panels):
        for i, g in enumerate(groups):
            by_step: dict[float, list[float]] = {}
            for r in g.runs:
                for s, v in zip(*curves[id(r)].get(name, ([], []))):
                    by_step.setdefault(s, []).append(v)
            if by_step:
                steps = sorted(by_step)
                ax.plot(
                    steps, [float(np.mean(by_step[s])) for s in steps], color=f"C{i}", label=row_label(i, g), lw=1.2
                )
        ax.set_title(name.removeprefix("train/"), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    legend = {}  # a row's colour is the same in every panel; a row may have only some panels
    for ax in axes:
        for h, lb in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lb, h)
    labels = sorted(legend, key=lambda lb: int(lb.split(":", 1)[0]))
    fig.legend(
        [legend[lb] for lb in labels], labels, loc="outside lower center", fontsize=7, ncols=min(2, len(labels))
    )
    return fig
