"""Format reward: graded credit for the expected answer structure.

For ``localize`` the expected answers are the ones the SFT data teaches:
``"Abnormality detected. Region <box>: <finding>. [Region <box>: <finding>. ...]"`` or the normal
sentence ``"No abnormality detected. The study appears normal."``. Boxes are found with the
backbone's own BoxFormat and replaced by the placeholder ``<box>`` before any regex runs, so the
same patterns work for every box format; ``<finding>`` in a pattern stands for any finding of the
vocabulary (or a lower-case word when there is no vocabulary).

The score is the mean of four checks, so it is graded, not binary:

1. ``opening``: the answer opens with a presence statement (``opening_regex``);
2. ``consistent``: the presence statement agrees with the boxes (abnormal with >= 1 box, normal
   with none); 0 without a presence statement;
3. ``clauses``: the fraction of boxes written as a full clause (``clause_regex``: ``Region <box>:
   <finding>.``); 1 for a normal statement without boxes; 0 for no statement and no box;
4. ``exact``: the whole answer (stripped) matches one of ``templates``.

A template answer scores 1, the empty string 0. Other tasks: NaN (``tasks``).
"""

from __future__ import annotations

import re
from typing import ClassVar

import torch

from unveil.data.frames import IDENTITY
from unveil.rewards._common import applies, box_format_of, frame_for_sample, per_sample, task_set
from unveil.rewards.base import RewardHead, Rollout

BOX = "<box>"
FINDING = "<finding>"
DEFAULT_OPENING = r"^\s*(?P<normal>No abnormality detected\.)|^\s*(?P<abnormal>Abnormality detected\.)"
DEFAULT_CLAUSE = r"Region <box>: <finding>\."
DEFAULT_TEMPLATES = (
    r"Abnormality detected\.(?: Region <box>: <finding>\.)+",
    r"No abnormality detected\. The study appears normal\.",
)


class FormatReward(RewardHead):
    name: ClassVar[str] = "format"
    needs: ClassVar[frozenset[str]] = frozenset({"text"})

    def __init__(
        self,
        opening_regex: str = DEFAULT_OPENING,
        clause_regex: str = DEFAULT_CLAUSE,
        templates: list[str] | tuple[str, ...] = DEFAULT_TEMPLATES,
        tasks: list[str] | str | None = ("localize",),
    ):
        self.opening = re.compile(opening_regex)
        if "normal" not in self.opening.groupindex or "abnormal" not in self.opening.groupindex:
            raise ValueError("format.opening_regex needs named groups (?P<normal>...) and (?P<abnormal>...)")
        self.clause_src = clause_regex
        self.templates_src = list(templates)
        self.tasks = task_set(tasks)
        self._compiled: dict[tuple[str, ...], tuple[re.Pattern, list[re.Pattern]]] = {}

    def _patterns(self, vocab: list[str]):
        key = tuple(vocab)
        if key not in self._compiled:
            finding = (
                "(?:" + "|".join(re.escape(v) for v in sorted(vocab, key=len, reverse=True)) + ")"
                if vocab
                else r"[a-z][a-z \-]*"
            )

            def sub(p: str) -> str:
                return p.replace(BOX, re.escape(BOX)).replace(FINDING, finding)

            self._compiled[key] = (
                re.compile(sub(self.clause_src), re.I),
                [re.compile(sub(t), re.I) for t in self.templates_src],
            )
        return self._compiled[key]

    def score(self, text: str, box_format, vocab: list[str], frame=None) -> float:
        text = text if isinstance(text, str) else ""
        spans = (frame or IDENTITY).parse_spans(box_format, text)
        parts, last = [], 0
        for sp in spans:  # a literal "<box>" the model wrote itself is not a box
            parts += [text[last : sp.start].replace(BOX, "<_box>"), BOX]
            last = sp.end
        t = "".join(parts + [text[last:].replace(BOX, "<_box>")])
        clause, templates = self._patterns(vocab)
        n_box = len(spans)
        m = self.opening.search(t)
        opening = m is not None
        says_normal = bool(m and m.group("normal"))
        consistent = opening and ((says_normal and n_box == 0) or (not says_normal and n_box > 0))
        if n_box:
            clauses = min(len(clause.findall(t)), n_box) / n_box
        else:
            clauses = 1.0 if says_normal else 0.0
        exact = any(p.fullmatch(t.strip()) for p in templates)
        return (float(opening) + float(consistent) + clauses + float(exact)) / 4.0

    def __call__(self, batch: Rollout) -> torch.Tensor:
        fmt = box_format_of(self.backbone)
        vocab = sorted(set(self.vocab or []) | {f for s in batch.samples for f in s.findings})

        def one(i: int) -> float:
            if not applies(self.tasks, batch.samples[i].task):
                return float("nan")
            return self.score(batch.texts[i], fmt, vocab, frame_for_sample(self.backbone, batch.samples[i]))

        return per_sample(self.name, one, len(batch))
