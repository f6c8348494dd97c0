"""Abnormal-localisation reward (UMed-LVLM's second reward, extended to several boxes).

Per completion of a ``localize`` sample:

- abnormal study (ground-truth boxes): every box in the text is parsed with the backbone's
  BoxFormat; predicted and ground-truth boxes are matched one-to-one by the Hungarian algorithm
  maximising (G)IoU; the score is ``sum(matched (G)IoU) / n_gt - extra_box_penalty * n_extra``
  where ``n_extra = max(0, n_pred - n_gt)``, clipped to ``[min_score, 1]``. Missed ground-truth
  boxes thus count 0. One predicted and one true box: the plain IoU of the paper. No parsable
  box: 0 (the paper's rule).
- normal study (no ground-truth box): ``normal_credit`` (default 1.0) for stating that there is
  no abnormality (``normal_regex``) with no box and no positive statement; 0 for any invented box
  and for any other answer (including an empty one).
- any other task: NaN (does not apply).

``mode: giou`` matches and scores with generalised IoU (range [-1, 1]); it still gives a signal
when the predicted box misses the true one entirely. ``match_label: true`` scores a matched
pair as ``min(value, 0)`` when the finding named with the box differs from the true one.
"""

from __future__ import annotations

import re
from typing import ClassVar

import torch

from unveil.data.boxes import match_boxes
from unveil.eval.parse import parse_answer
from unveil.rewards._common import applies, box_format_of, frame_for_sample, per_sample, task_set
from unveil.rewards.base import RewardHead, Rollout

DEFAULT_NORMAL_REGEX = (
    r"\b(no (abnormalit|lesion|finding|evidence|acute)|normal study|appears normal|unremarkable"
    r"|within normal limits)"
)


class LocalizationReward(RewardHead):
    name: ClassVar[str] = "localization"
    needs: ClassVar[frozenset[str]] = frozenset({"text"})

    def __init__(
        self,
        mode: str = "iou",
        normal_credit: float = 1.0,
        extra_box_penalty: float = 0.1,
        min_score: float = -1.0,
        match_label: bool = False,
        normal_regex: str = DEFAULT_NORMAL_REGEX,
        tasks: list[str] | str | None = ("localize",),
    ):
        if mode not in ("iou", "giou"):
            raise ValueError(f"localization.mode must be iou or giou, got {mode!r}")
        self.mode = mode
        self.normal_credit = float(normal_credit)
        self.extra_box_penalty = float(extra_box_penalty)
        self.min_score = float(min_score)
        self.match_label = bool(match_label)
        self.normal_re = re.compile(normal_regex, re.I)
        self.tasks = task_set(tasks)

    def score(self, text: str, gt_boxes, gt_findings, box_format, vocab, frame=None) -> float:
        """Score one completion against one study's ground truth (see the module docstring);
        ``frame`` maps the completion's boxes back to the original image."""
        text = text if isinstance(text, str) else ""
        pred = parse_answer(text, box_format, list(vocab or []), frame)
        gt = [list(map(float, b)) for b in (gt_boxes or [])]
        if not gt:
            if pred.boxes:
                return 0.0
            return self.normal_credit if (not pred.abnormal and self.normal_re.search(text)) else 0.0
        if not pred.boxes:
            return 0.0
        pairs, m = match_boxes(pred.boxes, gt, generalized=self.mode == "giou")
        total = 0.0
        for i, j in pairs:
            v = float(m[i, j])
            if self.match_label and j < len(gt_findings or []):
                lab = pred.labels[i]
                if lab is None or lab.lower() != str(gt_findings[j]).lower():
                    v = min(v, 0.0)
            total += v
        n_extra = max(0, len(pred.boxes) - len(gt))
        s = total / len(gt) - self.extra_box_penalty * n_extra
        return float(min(max(s, self.min_score), 1.0))

    def __call__(self, batch: Rollout) -> torch.Tensor:
        fmt = box_format_of(self.backbone)
        vocab = sorted(set(self.vocab or []) | {f for s in batch.samples for f in s.findings})

        def one(i: int) -> float:
            s = batch.samples[i]
            if not applies(self.tasks, s.task):
                return float("nan")
            return self.score(batch.texts[i], s.boxes, s.findings, fmt, vocab, frame_for_sample(self.backbone, s))

        return per_sample(self.name, one, len(batch))
