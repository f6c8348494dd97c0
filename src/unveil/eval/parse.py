"""Read a model answer: boxes (via the backbone's BoxFormat), finding labels, presence.

Never raises on any string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from unveil.data.frames import IDENTITY

_NEGATIVE = re.compile(
    r"\b(no (abnormalit|lesion|finding|evidence|acute)|normal study|appears normal|unremarkable|within normal limits)",
    re.I,
)
_POSITIVE = re.compile(r"\b(abnormality detected|abnormal|lesion|present)\b", re.I)


@dataclass
class Prediction:
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)  # finding named with each box
    abnormal: bool = False
    findings: list[str] = field(default_factory=list)  # every known finding named in the text


def _first_finding(text: str, vocab: list[str]) -> str | None:
    best, pos = None, len(text) + 1
    low = text.lower()
    for f in vocab:
        i = low.find(f.lower())
        if 0 <= i < pos:
            best, pos = f, i
    return best


def _last_finding(text: str, vocab: list[str]) -> str | None:
    best, pos = None, -1
    low = text.lower()
    for f in vocab:
        i = low.rfind(f.lower())
        if i > pos:
            best, pos = f, i
    return best


def box_labels(text: str, spans, vocab: list[str]) -> list[str | None]:
    """The finding each box names. Answers phrase it one way throughout: "Region [box]: nodule"
    (the label follows its box) or "a nodule at [box]" (it precedes it). When a finding is named
    before the first box and none after the last, labels precede their boxes: each box takes the
    last finding between the previous box and itself. Otherwise each takes the first finding after
    it and before the next box, else the one before it."""
    gaps = [text[(spans[k - 1].end if k else 0) : sp.start] for k, sp in enumerate(spans)]
    after = [text[sp.end : (spans[k + 1].start if k + 1 < len(spans) else len(text))] for k, sp in enumerate(spans)]
    if spans and _first_finding(gaps[0], vocab) and not _first_finding(after[-1], vocab):
        return [_last_finding(g, vocab) for g in gaps]
    return [_first_finding(a, vocab) or _first_finding(g, vocab) for a, g in zip(after, gaps)]


def parse_answer(text: str, box_format, vocab: list[str], frame=None) -> Prediction:
    """Boxes (in the original image: ``frame`` maps them out of the model's, see
    :mod:`unveil.data.frames`; None = the model sees the image as it is), labels and presence."""
    if not isinstance(text, str):
        text = ""
    spans = (frame or IDENTITY).parse_spans(box_format, text)
    labels = box_labels(text, spans, vocab)
    low = text.lower()
    named = [f for f in vocab if f.lower() in low]
    if spans:
        abnormal = True
    elif _NEGATIVE.search(text):
        abnormal = False
    else:
        abnormal = bool(named) or bool(_POSITIVE.search(text))
    return Prediction([sp.box for sp in spans], labels, abnormal, named)


def normalise_short(text: str) -> str:
    """Closed-question answers: lower case, strip punctuation and articles."""
    t = re.sub(r"[^\w\s]", " ", str(text).lower())
    t = re.sub(r"\b(a|an|the)\b", " ", t)
    return " ".join(t.split())


def closed_correct(pred: str, ref: str) -> bool:
    """Exact match after normalisation, or the reference as the first word(s) of the answer."""
    p, r = normalise_short(pred), normalise_short(ref)
    if not r:
        return False
    return p == r or p.startswith(r + " ")
