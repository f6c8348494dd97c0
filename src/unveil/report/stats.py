"""Per-group breakdowns and the paired bootstrap of a row's difference to a baseline row.

Paired bootstrap over test studies: the metrics of ``metrics.json`` are ratios of sums over the
test records (``iou`` = sum of per-study IoU / abnormal studies, ``acc50`` = boxes found / GT boxes,
...), and every run of an ablation scores the same records. Each of B resamples draws the test
*studies* (the records of one image: its localisation, presence and finding questions) with
replacement, the same draw for every run, and recomputes each run's ratio on it. A row's value is
the mean over its runs (seeds), so

    delta_b = mean_{r in row} m_r(b) - mean_{r in baseline} m_r(b),

and the 95% interval is the 2.5th and 97.5th percentiles of delta_b. The point estimate is the
difference on all records, which equals the difference of the ``metrics.json`` values. Pairing
removes the between-study variance both rows share, so an interval is much narrower than one
from two independent resamples; it covers the test-set noise only, not the seed spread (the std).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

from unveil.report.collect import Group, ReportRun


def breakdown_values(run: ReportRun, kind: str, metric: str, prefix: str = "test") -> list[str]:
    """The values of one breakdown (``modality``: ct, xray, ...; ``ability``) that ``run`` reports
    ``metric`` for (a null counts: the value exists, the metric had no studies there)."""
    out = set()
    for k in run.run.metrics:
        p = k.split("/")
        if len(p) == 4 and p[0] == prefix and p[1] == kind and p[3] == metric:
            out.add(p[2])
    return sorted(out)


def per_value(run: ReportRun, kind: str, metric: str, values: list[str], prefix: str = "test") -> dict[str, float]:
    """``metric`` per value of the breakdown (NaN where missing), and ``average``: the mean over the
    values that have one (NaN when none). A group's average is then taken over its runs."""
    out = {v: run.value(f"{prefix}/{kind}/{v}/{metric}") for v in values}
    finite = [x for x in out.values() if math.isfinite(x)]
    out["average"] = statistics.mean(finite) if finite else math.nan
    return out


def column(kind: str, metric: str, values: list[str], col: str, prefix: str = "test"):
    """``run -> value`` of one column of a breakdown table (a value or ``average``), for ``Group.stat``."""
    return lambda run: per_value(run, kind, metric, values, prefix)[col]


# --- paired bootstrap -------------------------------------------------------------------------------
def record_terms(rec: dict) -> dict[str, tuple[float, float]]:
    """(numerator, denominator) of each metric one predictions.jsonl record adds to, as
    :class:`unveil.eval.metrics.GroundingMetrics` sums them."""
    task = rec.get("task")
    if task == "localize":
        gt = rec.get("gt_boxes") or []
        out = {"presence_acc": (float(bool(rec.get("presence_ok"))), 1.0)}
        if gt:
            n = float(len(gt))
            out["iou"] = (float(rec.get("iou", 0.0)), 1.0)
            out["iou_strict"] = (float(rec.get("iou_strict", 0.0)), 1.0)
            out["acc50"] = (float(rec.get("hit50", 0.0)) * n, n)
            out["finding_acc"] = (float(rec.get("finding_ok", 0.0)) * n, n)
        else:
            out["fpr_normal"] = (float(not rec.get("presence_ok")), 1.0)
            out["invented_box_rate"] = (float(bool(rec.get("pred_boxes"))), 1.0)
        return out
    if "correct" in rec:
        return {("mcq_acc" if task == "mcq" else "closed_acc"): (float(bool(rec["correct"])), 1.0)}
    return {}


def study_key(rec: dict) -> str:
    """The test study a record belongs to: its images (the questions about one image are one study)."""
    images = rec.get("images") or []
    return "|".join(map(str, images)) if images else str(rec.get("id"))


@dataclass
class Delta:
    """A row's difference to the baseline in one metric: point estimate and 95% interval."""

    diff: float
    lo: float = math.nan
    hi: float = math.nan
    n_studies: int = 0
    reason: str = ""  # why there is no value or no interval


class _Sums:
    """Per-study sums of every run's metric terms, aligned on the baseline's test records."""

    def __init__(self, ref: ReportRun):
        self.ids = [r["id"] for r in ref.run.predictions]
        keys = [study_key(r) for r in ref.run.predictions]
        index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        self.cluster = np.array([index[k] for k in keys])
        self.n = len(index)
        self.cache: dict = {}

    def of(self, run: ReportRun, metric: str) -> tuple[np.ndarray, np.ndarray]:
        key = (id(run), metric)
        if key not in self.cache:
            by_id = {r.get("id"): r for r in run.run.predictions}
            terms = [record_terms(by_id[i]).get(metric, (0.0, 0.0)) for i in self.ids]
            num = np.bincount(self.cluster, [t[0] for t in terms], minlength=self.n)
            den = np.bincount(self.cluster, [t[1] for t in terms], minlength=self.n)
            self.cache[key] = (num, den)
        return self.cache[key]


def _unpaired_reason(group: Group, ids: set) -> str:
    for r in group.runs:
        if not r.run.predictions:
            return f"{r.path} has no predictions.jsonl"
        got = {p.get("id") for p in r.run.predictions}
        if got != ids:
            return f"{r.path} scored other test records than the baseline ({len(got)} vs {len(ids)})"
    return ""


def _row_values(sums: _Sums, group: Group, metric: str, weights: np.ndarray) -> tuple[float, np.ndarray]:
    """(value on all records, value per resample) of a group: the mean over its runs of each run's ratio."""
    full, boot = [], []
    with np.errstate(invalid="ignore", divide="ignore"):
        for r in group.runs:
            num, den = sums.of(r, metric)
            full.append(num.sum() / den.sum() if den.sum() > 0 else math.nan)
            boot.append((weights @ num) / (weights @ den))
    boot = np.array(boot)
    ok = np.isfinite(boot)
    mean_boot = np.where(ok.any(0), np.where(ok, boot, 0).sum(0) / np.maximum(ok.sum(0), 1), np.nan)
    return (float(np.nanmean(full)) if np.isfinite(full).any() else math.nan), mean_boot


def paired_bootstrap(
    groups: list[Group], baseline: int, metrics: list[str], n_boot: int = 2000, seed: int = 0
) -> dict[tuple[int, str], Delta]:
    """``{(row, metric): Delta}`` for every row and metric (the baseline row's own delta is 0)."""
    base = groups[baseline]
    ref = next((r for r in base.runs if r.run.predictions), None)
    if ref is None:
        reason = f"the baseline row ({base.label}) has no predictions.jsonl"
        return {(i, m): Delta(math.nan, reason=reason) for i in range(len(groups)) for m in metrics}
    ids = {p.get("id") for p in ref.run.predictions}
    sums = _Sums(ref)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(sums.n, np.full(sums.n, 1.0 / sums.n), size=n_boot).astype(np.float64)
    reasons = {i: _unpaired_reason(g, ids) for i, g in enumerate(groups)}
    out = {}
    for m in metrics:
        base_full, base_boot = (math.nan, None) if reasons[baseline] else _row_values(sums, base, m, weights)
        for i, g in enumerate(groups):
            why = reasons[i] or reasons[baseline]
            if why:
                out[(i, m)] = Delta(math.nan, reason=why)
                continue
            full, boot = _row_values(sums, g, m, weights)
            d = boot - base_boot
            d = d[np.isfinite(d)]
            if not math.isfinite(full - base_full):
                out[(i, m)] = Delta(math.nan, n_studies=sums.n, reason="no such studies")
            elif d.size == 0:
                out[(i, m)] = Delta(full - base_full, n_studies=sums.n)
            else:
                lo, hi = np.percentile(d, [2.5, 97.5])
                out[(i, m)] = Delta(full - base_full, float(lo), float(hi), n_studies=sums.n)
    return out
