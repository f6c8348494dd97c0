"""Relevance reward (UMed-LVLM's first reward): a judge scores the answer against the reference.

The judge comes from config through :func:`unveil.judges.build_judge` (``judge: {_target_: ...}``;
the offline overlap judge by default; :class:`~unveil.judges.openai_compat.OpenAIJudge` for an
OpenAI-compatible endpoint, :class:`~unveil.judges.hf_vlm.HFVLMJudge` for a local VLM, both with
a rubric such as ``umed_relevance``). Each completion is scored with a
:class:`~unveil.judges.JudgeItem` ``(question, reference, completion)`` plus the sample's image
paths (a judge that sees sends them), where the question is the last user turn of the prompt and
the reference is ``Sample.target`` (``reference: answer``: the short answer instead). Scores are
clipped to [0, 1].

NaN where the sample has no reference or its task is not in ``tasks`` (default: all): the head
does not apply. NaN also where the judge could not score (deadline passed, endpoint down,
unparsable reply; a judge that raises fails the whole batch): those rows are counted, and after
each call ``last_stats`` holds ``judge_failures`` (rows asked but not scored) and
``judge_requests`` (rows asked), which the composite logs as ``rewards/relevance/judge_*``. The
composite fills a failed row with its group's mean (``missing: group_mean`` in
``conf/reward/relevance.yaml``) so it moves no advantage.

``submit(batch)`` starts the judge's requests (HTTP judges answer later); the composite calls it
for every head before computing any, so the requests run while the other heads run the model.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch

from unveil.rewards._common import applies, finite_or_nan, task_set, warn_once
from unveil.rewards.base import RewardHead, Rollout

log = logging.getLogger("unveil.rewards")


def question_of(sample) -> str:
    for m in reversed(sample.prompt_messages):
        if m.get("role") in ("user", "virtual_user"):
            return str(m.get("content", "")).replace("<image>", "").strip()
    return ""


class RelevanceReward(RewardHead):
    name: ClassVar[str] = "relevance"
    needs: ClassVar[frozenset[str]] = frozenset({"text", "judge"})

    def __init__(self, judge=None, reference: str = "target", tasks: list[str] | str | None = None):
        from unveil.judges import build_judge

        if reference not in ("target", "answer"):
            raise ValueError(f"relevance.reference must be target or answer, got {reference!r}")
        self.judge = build_judge(judge, where="reward.relevance.judge")
        rubric = getattr(self.judge, "rubric", None)
        if getattr(rubric, "mode", "single") != "single":
            raise ValueError(
                f"reward.relevance.judge: rubric {rubric.name!r} compares two answers; the relevance head "
                "scores one answer against the reference (e.g. rubric: umed_relevance)"
            )
        self.reference = reference
        self.tasks = task_set(tasks)
        self.last_stats: dict[str, float] = {}
        self._pending: dict[int, tuple] = {}

    def _reference(self, sample) -> str:
        ref = sample.target if self.reference == "target" else sample.answer
        return str(ref) if ref is not None else ""

    def _items(self, batch: Rollout):
        from unveil.judges import JudgeItem

        idx, items = [], []
        for i, s in enumerate(batch.samples):
            ref = self._reference(s)
            if not applies(self.tasks, s.task) or not ref.strip():
                continue
            text = batch.texts[i]
            idx.append(i)
            items.append(JudgeItem(question_of(s), ref, text if isinstance(text, str) else "", s.images or ()))
        return idx, items

    def submit(self, batch: Rollout) -> None:
        """Start scoring ``batch`` now; ``__call__`` on the same batch collects it."""
        idx, items = self._items(batch)
        try:
            handle = self.judge.submit(items) if items and hasattr(self.judge, "submit") else None
        except Exception as e:  # noqa: BLE001  (scored again, synchronously, by __call__)
            warn_once(f"relevance:submit:{type(e).__name__}", "judge submit raised %s: %s", type(e).__name__, e)
            handle = None
        self._pending = {id(batch): (idx, handle)} if handle is not None else {}

    def _scores(self, batch: Rollout, idx: list, items: list) -> list | None:
        pending = self._pending.pop(id(batch), None)
        if pending is not None and pending[0] == idx:
            return list(pending[1].result())
        return list(self.judge.score_batch(items))

    def __call__(self, batch: Rollout) -> torch.Tensor:
        n = len(batch)
        out = torch.full((n,), float("nan"), dtype=torch.float32)
        idx, items = self._items(batch)
        self.last_stats = {"judge_requests": float(len(items)), "judge_failures": 0.0}
        if not items:
            self._pending.clear()
            return out
        try:
            scores = self._scores(batch, idx, items)
        except Exception as e:  # noqa: BLE001  (a judge outage must not stop training)
            warn_once(f"relevance:{type(e).__name__}", "judge %s raised %s: %s; relevance scored NaN",
                      getattr(self.judge, "name", "?"), type(e).__name__, e)  # fmt: skip
            self.last_stats["judge_failures"] = float(len(items))
            return out
        if len(scores) != len(items):
            warn_once("relevance:len", "judge returned %d scores for %d items; relevance scored NaN",
                      len(scores), len(items))  # fmt: skip
            self.last_stats["judge_failures"] = float(len(items))
            return out
        for i, v in zip(idx, scores):
            v = finite_or_nan(v)
            out[i] = min(max(v, 0.0), 1.0) if v == v else float("nan")
        failed = int(torch.isnan(out[idx]).sum())
        self.last_stats["judge_failures"] = float(failed)
        if failed:
            log.warning("relevance: the judge did not score %d of %d completion(s): NaN, counted", failed, len(items))
        return out
