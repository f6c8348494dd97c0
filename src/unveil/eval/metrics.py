"""Grounding metrics as a torchmetrics Metric (sums in states: DDP-safe, mergeable).

Per study (a ``localize`` sample):
- matched IoU: Hungarian matching of predicted to ground-truth boxes; each GT box scores the
  IoU of its match (0 if unmatched); averaged over the GT boxes of the study, then studies.
- strict matched IoU (``iou_strict``): the same sum of matched IoUs divided by
  max(#predicted, #GT), so every box beyond the GT count is a miss. Plain matched IoU does not
  see extra boxes: a model (or an RL policy) that always emits two boxes loses nothing there.
- acc@0.5: share of GT boxes whose matched IoU >= 0.5.
- finding accuracy: share of GT boxes whose matched prediction names the right finding.
- presence accuracy: predicted abnormal/normal equals truth (all studies).
- false-positive rate: normal studies predicted abnormal; invented-box rate: normal studies
  with at least one box.
Closed questions (``vqa_closed``): normalised exact match. Multiple choice (``mcq``): option
letter match, reported per ability. Open questions (``vqa_open``): ``open_em`` (exact match) and
``open_recall`` (token recall); reports (``report``, ``describe``): ``bleu1`` .. ``bleu4`` and
``rouge_l`` (:mod:`unveil.eval.text_metrics` has the definitions).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torchmetrics import Metric

from unveil.data.boxes import match_boxes
from unveil.eval.text_metrics import ReportScores, open_scores

_STATES = [
    "iou_sum",
    "iou_strict_sum",
    "n_abnormal",
    "hit50",
    "find_ok",
    "n_gt",
    "presence_ok",
    "n_studies",
    "fp",
    "invented",
    "n_normal",
    "closed_ok",
    "n_closed",
    "mcq_ok",
    "n_mcq",
    "open_ok",
    "open_recall_sum",
    "n_open",
]


class GroundingMetrics(Metric):
    full_state_update = False

    def __init__(self, iou_threshold: float = 0.5, **kw):
        super().__init__(**kw)
        self.iou_threshold = iou_threshold
        for s in _STATES:
            self.add_state(s, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self._scores: dict = {}  # the last study's scores (update_study returns them)
        # corpus BLEU / ROUGE keep their own states (one process scores the split: no sync)
        self.reports = ReportScores(sync_on_compute=kw.get("sync_on_compute", True))

    # Every update goes through torchmetrics' wrapped ``update``, which counts updates and drops
    # the cached result of ``compute`` (called directly, a second compute returned the first one's
    # figures). The typed methods below are what callers use.
    def update_study(self, pred, gt_boxes, gt_findings) -> dict:
        """Add one localisation study; returns its per-study scores for the predictions file."""
        self.update("study", pred, gt_boxes, gt_findings)
        return self._scores

    def update_closed(self, correct: bool) -> None:
        self.update("closed", correct)

    def update_mcq(self, correct: bool) -> None:
        self.update("mcq", correct)

    def update_open(self, prediction: str, reference: str) -> dict:
        """Add one open answer; returns its ``open_em`` and ``open_recall``."""
        self.update("open", prediction, reference)
        return self._scores

    def update_report(self, prediction: str, reference: str) -> None:
        self.update("report", prediction, reference)

    def update(self, kind: str, *args) -> None:
        if kind == "study":
            self._update_study(*args)
        elif kind == "closed":
            self.n_closed += 1
            self.closed_ok += float(args[0])
        elif kind == "mcq":
            self.n_mcq += 1
            self.mcq_ok += float(args[0])
        elif kind == "open":
            exact, recall = open_scores(*args)
            self.n_open += 1
            self.open_ok += float(exact)
            self.open_recall_sum += recall
            self._scores = {"open_em": exact, "open_recall": recall}
        elif kind == "report":
            self.reports.update(*args)
        else:
            raise ValueError(
                f"GroundingMetrics.update: kind must be 'study', 'closed', 'mcq', 'open' or 'report', not {kind!r}"
            )

    def _update_study(self, pred, gt_boxes, gt_findings) -> None:
        abnormal = len(gt_boxes) > 0
        self.n_studies += 1
        self.presence_ok += float(pred.abnormal == abnormal)
        out = {"presence_ok": pred.abnormal == abnormal}
        if not abnormal:
            self.n_normal += 1
            self.fp += float(pred.abnormal)
            self.invented += float(len(pred.boxes) > 0)
            self._scores = out
            return
        pairs, m = match_boxes(pred.boxes, gt_boxes)
        per_gt = np.zeros(len(gt_boxes))
        ok = np.zeros(len(gt_boxes))
        for p, g in pairs:
            per_gt[g] = m[p, g]
            ok[g] = float(pred.labels[p] is not None and pred.labels[p] == gt_findings[g])
        self.n_abnormal += 1
        self.iou_sum += float(per_gt.mean())
        strict = float(per_gt.sum() / max(len(pred.boxes), len(gt_boxes)))
        self.iou_strict_sum += strict
        self.n_gt += len(gt_boxes)
        self.hit50 += float((per_gt >= self.iou_threshold).sum())
        self.find_ok += float(ok.sum())
        out.update(
            iou=float(per_gt.mean()),
            iou_strict=strict,
            hit50=float((per_gt >= self.iou_threshold).mean()),
            finding_ok=float(ok.mean()),
        )
        self._scores = out

    def compute(self) -> dict[str, float]:
        def ratio(a, b):
            return float(a / b) if b > 0 else float("nan")

        return {
            "iou": ratio(self.iou_sum, self.n_abnormal),
            "iou_strict": ratio(self.iou_strict_sum, self.n_abnormal),
            "acc50": ratio(self.hit50, self.n_gt),
            "finding_acc": ratio(self.find_ok, self.n_gt),
            "presence_acc": ratio(self.presence_ok, self.n_studies),
            "fpr_normal": ratio(self.fp, self.n_normal),
            "invented_box_rate": ratio(self.invented, self.n_normal),
            "closed_acc": ratio(self.closed_ok, self.n_closed),
            "mcq_acc": ratio(self.mcq_ok, self.n_mcq),
            "open_em": ratio(self.open_ok, self.n_open),
            "open_recall": ratio(self.open_recall_sum, self.n_open),
            **self.reports.compute(),
            "n_studies": float(self.n_studies),
            "n_closed": float(self.n_closed),
            "n_mcq": float(self.n_mcq),
            "n_open": float(self.n_open),
            "n_report": float(self.reports.n),
        }


class GroupedMetrics:
    """One GroundingMetrics overall and one per group value (modality, ability)."""

    def __init__(self, **kw):
        self.kw = kw
        self.overall = GroundingMetrics(**kw)
        self.groups: dict[str, dict[str, GroundingMetrics]] = defaultdict(dict)

    def of(self, group: str, value: str) -> GroundingMetrics:
        g = self.groups[group]
        if value not in g:
            g[value] = GroundingMetrics(**self.kw)
        return g[value]

    def compute(self, prefix: str = "test") -> dict[str, float]:
        out = {f"{prefix}/{k}": v for k, v in self.overall.compute().items()}
        for group, metrics in sorted(self.groups.items()):
            for value, m in sorted(metrics.items()):
                for k, v in m.compute().items():
                    out[f"{prefix}/{group}/{value}/{k}"] = v
        return out
