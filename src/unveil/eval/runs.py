"""Read finished runs back for analysis in a notebook: metrics, predictions, where IoU is lost.

Everything here reads the files a run already writes (``metrics.json``, ``predictions.jsonl``,
``.hydra/config.yaml``), so it works on runs copied off a cluster, with no model loaded.

    from unveil.eval.runs import load_run, localisation_breakdown, draw_study
    run = load_run("logs/train/runs/<stamp>")
    run.table()                                   # metric x (overall, modality/...) rows
    localisation_breakdown(run.predictions)       # IoU by (#GT boxes, #predicted boxes)
    draw_study(run.worst(1)[0])                   # the image, GT boxes green, predicted red

Training metrics carry TRL's names (``train/reward``, ``train/rewards/<head>/mean``,
``train/clip_ratio/region_mean``, ...). Runs written before that rename used others
(``reward/total/mean``, ``train/clip_frac``, ...): :data:`OLD_METRIC_NAMES` maps them, and
:func:`load_run` reads an old run under the new names.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

TABLE_METRICS = (
    "presence_acc",
    "iou",
    "iou_strict",
    "acc50",
    "finding_acc",
    "fpr_normal",
    "invented_box_rate",
    "closed_acc",
    "mcq_acc",
    "open_em",
    "open_recall",
    "bleu4",
    "rouge_l",
)


# The training-metric names of runs written before the stages took TRL's (old -> new); ``<h>`` is a
# reward head. Old per-head and total rewards were logged without the train/ prefix. Definitions
# are unchanged, except that the reward stds were population stds then (TRL's are Bessel-corrected).
OLD_METRIC_NAMES = {
    "reward/total/mean": "train/reward",
    "reward/total/std": "train/reward_std",
    "reward/total/zero_spread_frac": "train/frac_reward_zero_std",
    "reward/<h>/mean": "train/rewards/<h>/mean",
    "reward/<h>/std": "train/rewards/<h>/std",
    "reward/<h>/zero_spread_frac": "train/rewards/<h>/frac_zero_std",
    "reward/<h>/applicable_frac": "train/rewards/<h>/applicable_frac",
    "val/reward/total/mean": "val/reward",
    "val/reward/total/std": "val/reward_std",
    "val/reward/<h>/mean": "val/rewards/<h>/mean",
    "val/reward/<h>/std": "val/rewards/<h>/std",
    "val/reward/<h>/zero_spread_frac": "val/rewards/<h>/frac_zero_std",
    "val/reward/<h>/applicable_frac": "val/rewards/<h>/applicable_frac",
    "train/clip_frac": "train/clip_ratio/region_mean",
    "train/value_clip_frac": "train/value_clip_ratio",
    "train/completion_len": "train/completions/mean_length",
    "val/completion_len": "val/completions/mean_length",
    "train/truncated_frac": "train/completions/clipped_ratio",
    "time/generate_s": "train/time/generate_s",
    "time/reward_s": "train/time/reward_s",
    "time/update_s": "train/time/update_s",
    "time/step_s": "train/time/step_s",
}
_OLD_PATTERNS = [
    (re.compile("^" + re.escape(old).replace(re.escape("<h>"), "([^/]+)") + "$"), new)
    for old, new in OLD_METRIC_NAMES.items()
]


def metric_name(name: str) -> str:
    """The current name of a metric: ``name`` itself, or what :data:`OLD_METRIC_NAMES` renamed it to."""
    for pattern, new in _OLD_PATTERNS:
        m = pattern.match(name)
        if m:
            return new.replace("<h>", m.group(1)) if m.groups() else new
    return name


def current_names(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` with old names replaced by the current ones (a current name present wins)."""
    out = {metric_name(k): v for k, v in metrics.items() if metric_name(k) not in metrics}
    out.update({k: v for k, v in metrics.items() if metric_name(k) == k})
    return out


@dataclass
class Run:
    path: Path
    metrics: dict[str, float]
    predictions: list[dict] = field(default_factory=list)
    config: dict | None = None  # the run's resolved Hydra config, when .hydra/config.yaml is there

    @property
    def name(self) -> str:
        return self.path.name

    def groups(self, prefix: str = "test") -> list[str]:
        """ "overall" and every group the evaluation split by, e.g. "modality/ct"."""
        seen = []
        for k in self.metrics:
            parts = k.split("/")
            if parts[0] == prefix and len(parts) == 4 and "/".join(parts[1:3]) not in seen:
                seen.append("/".join(parts[1:3]))
        return ["overall", *sorted(seen)]

    def table(self, metrics=TABLE_METRICS, prefix: str = "test") -> list[dict]:
        """One row per group: {"group": ..., metric: value, ...}; metrics the run lacks are left out."""
        rows = []
        for g in self.groups(prefix):
            key = f"{prefix}/" if g == "overall" else f"{prefix}/{g}/"
            row = {"group": g}
            row.update({m: self.metrics[key + m] for m in metrics if key + m in self.metrics})
            rows.append(row)
        return rows

    def localisation(self) -> list[dict]:
        """The prediction records of abnormal localisation studies (the ones with an IoU)."""
        return [r for r in self.predictions if r.get("task") == "localize" and r.get("gt_boxes")]

    def worst(self, n: int = 5, metric: str = "iou") -> list[dict]:
        """The n abnormal localisation studies with the lowest ``metric``."""
        return sorted(self.localisation(), key=lambda r: r.get(metric, 0.0))[:n]


def load_run(path: str | Path, predictions: bool = True) -> Run:
    """A run dir (the one holding ``metrics.json``), or any file inside it. Metrics are read under
    their current names (:func:`current_names`), whatever names the run wrote."""
    p = Path(path)
    for d in [p, *p.parents]:
        if (d / "metrics.json").exists():
            p = d
            break
    else:
        raise FileNotFoundError(f"{path}: no metrics.json here or above; is this a finished run dir?")
    preds = []
    if predictions and (p / "predictions.jsonl").exists():
        with open(p / "predictions.jsonl", encoding="utf-8") as f:
            preds = [json.loads(line) for line in f if line.strip()]
    config = None
    if (p / ".hydra" / "config.yaml").exists():
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(p / ".hydra" / "config.yaml"), resolve=False)
    metrics = current_names(json.loads((p / "metrics.json").read_text(encoding="utf-8")))
    return Run(path=p, metrics=metrics, predictions=preds, config=config)


def localisation_breakdown(predictions: list[dict]) -> list[dict]:
    """Abnormal localisation studies grouped by (#GT boxes, #predicted boxes): count, share and
    mean IoU / strict IoU of each group, and how much of the overall mean IoU each group costs
    (share x (1 - IoU)). Shows at a glance whether IoU is lost to imprecise boxes or to lesions
    the model never names."""
    groups: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for r in predictions:
        if r.get("task") == "localize" and r.get("gt_boxes"):
            groups[(len(r["gt_boxes"]), len(r.get("pred_boxes") or []))].append(r)
    total = sum(len(v) for v in groups.values())
    rows = []
    for (n_gt, n_pred), rs in sorted(groups.items()):
        iou = sum(r.get("iou", 0.0) for r in rs) / len(rs)
        row = {
            "gt_boxes": n_gt,
            "pred_boxes": n_pred,
            "studies": len(rs),
            "share": len(rs) / total,
            "iou": iou,
            "iou_lost": len(rs) / total * (1 - iou),
        }
        if all("iou_strict" in r for r in rs):
            row["iou_strict"] = sum(r["iou_strict"] for r in rs) / len(rs)
        rows.append(row)
    return rows


def draw_study(record: dict, image=None, size: int = 256):
    """A PIL image of one prediction record: ground-truth boxes in green, predicted boxes in red,
    each with its label. ``image`` defaults to the record's first image path (``images``)."""
    from PIL import ImageDraw

    from unveil.data.images import load_image

    if image is None:
        paths = record.get("images") or []
        if not paths:
            raise ValueError(f"prediction {record.get('id')!r} has no 'images' path; pass image=")
        image = load_image(paths[0])
    im = image.convert("RGB").resize((size, size))
    d = ImageDraw.Draw(im)
    for boxes, labels, colour in (
        (record.get("gt_boxes") or [], record.get("gt_findings") or [], (0, 200, 0)),
        (record.get("pred_boxes") or [], record.get("pred_labels") or [], (230, 30, 30)),
    ):
        for k, b in enumerate(boxes):
            x1, y1, x2, y2 = (max(0, min(size - 1, round(v * size))) for v in b)
            d.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=colour, width=2)
            label = labels[k] if k < len(labels) and labels[k] else ""
            if label:
                d.text((min(x1, x2) + 2, max(0, min(y1, y2) - 11)), label, fill=colour)
    return im


def compare(runs: list[Run], metric: str = "iou", prefix: str = "test") -> list[dict]:
    """One row per run: ``metric`` overall and per group, for a quick side-by-side."""
    groups = sorted({g for r in runs for g in r.groups(prefix)}, key=lambda g: (g != "overall", g))
    # name runs by their path below the deepest common folder: sweeps end in seed0, seed0, ...
    common = Path(os.path.commonpath([str(r.path.resolve()) for r in runs])) if runs else Path()
    rows = []
    for r in runs:
        rel = r.path.resolve().relative_to(common) if len(runs) > 1 else Path(r.name)
        row = {"run": str(rel) if str(rel) != "." else r.name}
        for g in groups:
            key = f"{prefix}/{metric}" if g == "overall" else f"{prefix}/{g}/{metric}"
            row[g] = r.metrics.get(key, float("nan"))
        rows.append(row)
    return rows
