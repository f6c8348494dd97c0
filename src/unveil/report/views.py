"""Rows for the ablation notebooks: committed tables, completions with their per-head rewards, where a
row loses IoU against the baseline, invented boxes. Each returns plain dicts (a table in a notebook)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from unveil.eval.runs import localisation_breakdown
from unveil.report.collect import Group, ReportRun


def read_table(path: str | Path) -> list[dict]:
    """A committed results CSV as rows, numbers as floats (an empty cell is NaN)."""

    def cell(v: str):
        if v == "":
            return math.nan
        try:
            return float(v)
        except ValueError:
            return v

    with open(path, encoding="utf-8", newline="") as f:
        return [{k: cell(v) for k, v in row.items()} for row in csv.DictReader(f)]


def sweep_parts(sweep: str | Path, parts: tuple[str, ...]) -> list[Path]:
    """The sub-folders of an ablation's root in table order (``sft``, then ``rl``), those that exist;
    the root itself when none does (any sweep dir)."""
    sweep = Path(sweep)
    found = [sweep / p for p in parts if (sweep / p).exists()]
    return found or [sweep]


def completions(run: ReportRun, step: int | None = None) -> list[dict]:
    """The logged completions of ``step`` (default the last logged step), best reward first: the
    sample, the completion, the composite reward, each head's reward and the advantage."""
    f = run.path / "completions.jsonl"
    if not f.exists():
        return []
    rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        return []
    step = max(r.get("step", 0) for r in rows) if step is None else step
    keep = ("sample_id", "task", "completion", "reference", "reward", "advantage")
    out = []
    for r in rows:
        if r.get("step", 0) == step:
            row = {k: r.get(k) for k in keep}
            row.update({k.removeprefix("rewards/"): v for k, v in r.items() if k.startswith("rewards/")})
            out.append(row)
    return sorted(out, key=lambda r: -(r["reward"] if r["reward"] is not None else -math.inf))


def lost_iou(group: Group) -> list[dict]:
    """:func:`unveil.eval.runs.localisation_breakdown` over the predictions of all the group's runs:
    IoU and the share of 1 - IoU lost per (#GT boxes, #predicted boxes)."""
    return localisation_breakdown([p for r in group.runs for p in r.run.predictions])


def study_changes(base: ReportRun, run: ReportRun, metric: str = "iou", n: int = 5) -> list[dict]:
    """The ``n`` test records where ``run`` lost most ``metric`` against ``base`` (the same records,
    paired by id), with both answers."""
    by_id = {p.get("id"): p for p in base.run.predictions}
    rows = []
    for p in run.run.predictions:
        b = by_id.get(p.get("id"))
        if b is not None and metric in p and metric in b:
            rows.append(
                {
                    "id": p["id"],
                    f"base_{metric}": b[metric],
                    metric: p[metric],
                    "change": p[metric] - b[metric],
                    "base_answer": b.get("prediction"),
                    "answer": p.get("prediction"),
                    "reference": p.get("reference"),
                }
            )
    return sorted(rows, key=lambda r: r["change"])[:n]


def invented_boxes(run: ReportRun) -> list[dict]:
    """Normal localisation studies (no ground-truth box) the run answered with boxes."""
    return [
        {"id": p.get("id"), "boxes": len(p.get("pred_boxes") or []), "answer": p.get("prediction")}
        for p in run.run.predictions
        if p.get("task") == "localize" and not p.get("gt_boxes") and p.get("pred_boxes")
    ]
