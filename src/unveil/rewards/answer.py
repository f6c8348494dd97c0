"""Answer-correctness reward for questions with a short reference answer (``Sample.answer``).

- multiple choice (``task`` in ``mcq_tasks``, default ``mcq``): 1 when the completion commits
  to exactly one option letter and it is the reference's letter; 0 otherwise, including answers
  that hedge over several letters ("A or B", "A, B", "A/B", "A: ... B: ..."). A reference whose
  letter cannot be read is compared as a closed answer.
- closed questions (anything else with a short answer): normalised exact match (lower case,
  punctuation and articles removed) of the whole completion or of its first clause (text up to
  the first ``.``, ``,``, ``;``, ``:``, ``!``, ``?`` or newline), so "Nodule." and "Nodule, in
  the left lung." are right and "nodule or mass" is not. Yes/no references: the completion's
  first word must be the same polarity and its first clause must not also contain the other.
- NaN when the sample has no short answer (open questions, localisation).

Binary scores; partial credit would reward hedging.
"""

from __future__ import annotations

import re
from typing import ClassVar

import torch

from unveil.eval.parse import normalise_short
from unveil.rewards._common import per_sample, task_set
from unveil.rewards.base import RewardHead, Rollout

# No two whitespace runs touch without a literal between them: adjacent "\s*\s*" made matching
# quadratic in a whitespace run ("answer" + 16,000 spaces took 10 s in a reward call).
_KW = r"(?:(?i:the)\s+)?(?:(?i:correct)\s+)?(?i:answer|option|choice)(?:\s*(?i:is))?\s*(?::\s*)?"
# A leading letter counts as an option; "A" only when punctuation, the end or a capitalised option
# text follows ("A: ...", "A Chest CT"): "A nodule ..." is an article. Letters are upper case only.
_LEADING = re.compile(r"^\s*(?:" + _KW + r")?\(?(?:([B-H])\)?(?=[\s:.,;)\]]|$)|(A)\)?(?=[:.,;)\]]|\s*$|\s+[A-Z0-9]))")
_LABELLED = re.compile(r"(?:^|[\s(\[])([A-H])(?=\s*[:)\]])")  # "A:", "(B)", "C)"
_LIST = re.compile(r"(?<![A-Za-z])\(?([A-H])\)?\s*(?:,|/|&|\bor\b|\band\b)\s*\(?([A-H])\)?(?![A-Za-z])")
_ANSWER_IS = re.compile(r"\b" + _KW + r"\(?([A-H])\)?(?![A-Za-z])")
_CLAUSE = re.compile(r"[.,;:!?\n]")
_SPACE_RUN = re.compile(r"\s{2,}")


def squeeze(text: str) -> str:
    """Whitespace runs to one character (a newline where the run held one: it ends a clause), so
    the patterns below scan a few characters where a model may emit thousands of spaces."""
    return _SPACE_RUN.sub(lambda m: "\n" if "\n" in m.group() else " ", text)


_YES, _NO = "yes", "no"


def option_letters(text: str) -> set[str]:
    """Every option letter the text commits to (leading letter, "answer is X", "X:", "X or Y")."""
    text = text if isinstance(text, str) else ""
    letters: set[str] = set()
    m = _LEADING.match(text)
    if m:
        letters.add(m.group(1) or m.group(2))
    letters |= {l.upper() for l in _ANSWER_IS.findall(text)}
    letters |= set(_LABELLED.findall(text))
    for a, b in _LIST.findall(text):
        letters |= {a, b}
    return letters


def single_letter(text: str) -> str | None:
    letters = option_letters(text)
    return letters.pop() if len(letters) == 1 else None


def first_clause(text: str) -> str:
    return _CLAUSE.split(text if isinstance(text, str) else "", maxsplit=1)[0]


def closed_match(pred: str, ref: str) -> bool:
    r = normalise_short(ref)
    if not r:
        return False
    p_all, p_first = normalise_short(pred), normalise_short(first_clause(pred))
    if r in (_YES, _NO):
        other = _NO if r == _YES else _YES
        words = p_first.split()
        return p_all == r or (bool(words) and words[0] == r and other not in words)
    return p_all == r or p_first == r


class AnswerReward(RewardHead):
    name: ClassVar[str] = "answer"
    needs: ClassVar[frozenset[str]] = frozenset({"text"})

    def __init__(self, mcq_tasks: list[str] | str = ("mcq",), tasks: list[str] | str | None = None):
        self.mcq_tasks = task_set(mcq_tasks) or frozenset()
        self.tasks = task_set(tasks)

    def score(self, text: str, reference: str | None, task: str) -> float:
        if reference is None or not str(reference).strip():
            return float("nan")
        reference, text = str(reference), squeeze(text if isinstance(text, str) else "")
        if task in self.mcq_tasks:
            ref = single_letter(reference)
            if ref is not None:
                return float(single_letter(text) == ref)
        return float(closed_match(text, reference))

    def __call__(self, batch: Rollout) -> torch.Tensor:
        def one(i: int) -> float:
            s = batch.samples[i]
            if self.tasks is not None and s.task not in self.tasks:
                return float("nan")
            return self.score(batch.texts[i], s.answer, s.task)

        return per_sample(self.name, one, len(batch))
