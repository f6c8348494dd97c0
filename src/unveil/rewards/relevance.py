"""Relevance reward (UMed-LVLM's first reward): a judge scores the answer against the reference.

The judge comes from config through :func:`unveil.judges.build_judge` (``judge: {kind: overlap}``
offline by default; ``hf`` for a local causal LM, ``openai`` for an OpenAI-compatible endpoint).
Each completion is scored with ``(question, reference, completion)``, where the question is the
last user turn of the prompt and the reference is ``Sample.target`` (the reference answer;
``reference: answer`` uses the short answer instead). Scores are clipped to [0, 1]; a judge
that cannot score an item gives NaN for it, and a judge that raises gives NaN for the batch.
NaN also when the sample has no reference or its task is not in ``tasks`` (default: all).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from unveil.rewards._common import applies, finite_or_nan, task_set, warn_once
from unveil.rewards.base import RewardHead, RolloutBatch


def question_of(sample) -> str:
    for m in reversed(sample.prompt_messages):
        if m.get("role") in ("user", "virtual_user"):
            return str(m.get("content", "")).replace("<image>", "").strip()
    return ""


class RelevanceReward(RewardHead):
    name: ClassVar[str] = "relevance"
    needs: ClassVar[frozenset[str]] = frozenset({"text", "judge"})

    def __init__(self, judge=None, reference: str = "target", tasks: list[str] | str | None = None):
        from unveil.judges import Judge, build_judge

        if reference not in ("target", "answer"):
            raise ValueError(f"relevance.reference must be target or answer, got {reference!r}")
        self.judge = judge if isinstance(judge, Judge) else build_judge(judge or {"kind": "overlap"})
        self.reference = reference
        self.tasks = task_set(tasks)

    def _reference(self, sample) -> str:
        ref = sample.target if self.reference == "target" else sample.answer
        return str(ref) if ref is not None else ""

    def __call__(self, batch: RolloutBatch) -> torch.Tensor:
        n = len(batch)
        out = torch.full((n,), float("nan"), dtype=torch.float32)
        idx, items = [], []
        for i, s in enumerate(batch.samples):
            ref = self._reference(s)
            if not applies(self.tasks, s.task) or not ref.strip():
                continue
            text = batch.completions[i]
            idx.append(i)
            items.append((question_of(s), ref, text if isinstance(text, str) else ""))
        if not items:
            return out
        try:
            scores = list(self.judge.score_batch(items))
        except Exception as e:  # noqa: BLE001  (a judge outage must not stop training)
            warn_once(
                f"relevance:{type(e).__name__}",
                "judge %s raised %s: %s; relevance scored NaN",
                getattr(self.judge, "name", "?"),
                type(e).__name__,
                e,
            )
            return out
        if len(scores) != len(items):
            warn_once(
                "relevance:len", "judge returned %d scores for %d items; relevance scored NaN", len(scores), len(items)
            )
            return out
        for i, v in zip(idx, scores):
            v = finite_or_nan(v)
            out[i] = min(max(v, 0.0), 1.0) if v == v else float("nan")
        return out
