"""The judge contract and the default offline judge (reference overlap)."""

from __future__ import annotations

import importlib
import math
import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"[a-z0-9]+")
_NEG = re.compile(r"\b(no|not|without|absent|negative|normal)\b")


class Judge:
    """Scores (question, reference, answer) triples in [0, 1]. Never raises on model text.

    Implementations override ``score_batch``; a judge that cannot score an item (endpoint
    down, unparsable reply) returns NaN for it, and callers decide what NaN means.
    """

    name = "judge"

    def score(self, question: str, reference: str, answer: str) -> float:
        return self.score_batch([(question, reference, answer)])[0]

    def score_batch(self, items: Sequence[tuple[str, str, str]]) -> list[float]:
        raise NotImplementedError


def _tokens(text: str) -> list[str]:
    # Box coordinates are scored by the localisation head, not here: drop bare numbers.
    return [w for w in _WORD.findall(str(text).lower()) if not w.isdigit()]


class OverlapJudge(Judge):
    """Offline default: token F1 between answer and reference, times a negation agreement term.

    Cheap and deterministic; "no abnormality" vs "abnormality detected" share words but
    disagree on negation, which the agreement factor catches.
    """

    name = "overlap"

    def __init__(self, negation_penalty: float = 0.5):
        self.negation_penalty = float(negation_penalty)

    def score_batch(self, items):
        out = []
        for _q, ref, ans in items:
            r, a = _tokens(ref), _tokens(ans)
            if not r or not a:
                out.append(0.0)
                continue
            common = sum((Counter(r) & Counter(a)).values())
            if common == 0:
                out.append(0.0)
                continue
            p, rc = common / len(a), common / len(r)
            f1 = 2 * p * rc / (p + rc)
            if bool(_NEG.search(" ".join(r))) != bool(_NEG.search(" ".join(a))):
                f1 *= 1.0 - self.negation_penalty
            out.append(float(min(max(f1, 0.0), 1.0)) if math.isfinite(f1) else 0.0)
        return out


# kind -> "module:Class"; a new judge is one module plus one entry here.
JUDGES = {
    "overlap": "unveil.judges.base:OverlapJudge",
    "hf": "unveil.judges.hf:HFJudge",
    "openai": "unveil.judges.openai_compat:OpenAIJudge",
}


def build_judge(cfg) -> Judge:
    cfg = dict(cfg or {"kind": "overlap"})
    kind = cfg.pop("kind", "overlap")
    if kind not in JUDGES:
        raise ValueError(f"unknown judge kind {kind!r}; known: {sorted(JUDGES)}")
    mod, cls = JUDGES[kind].split(":")
    return getattr(importlib.import_module(mod), cls)(**cfg)
