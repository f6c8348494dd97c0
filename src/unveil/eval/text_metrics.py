"""Scores of free text: open answers (exact match, token recall) and reports (BLEU-1..4, ROUGE-L).

Open questions (``vqa_open``: SLAKE / VQA-RAD open rows, Med-MIM ``conv`` items), against the
reference answer, both normalised as closed answers are (lower case, punctuation and the
articles a / an / the removed):

- exact match: the normalised prediction equals the normalised reference;
- token recall: the share of the reference's tokens the prediction contains, each token counted
  at most as often as the prediction has it,
  ``recall = sum_w min(c_pred(w), c_ref(w)) / sum_w c_ref(w)``.
  This is the "open" (recall) column of LLaVA-Med's evaluation, which MMedPO and STLLaVA-Med
  report. LLaVA-Med's ``calculate_f1score`` counts a shared word as often as the *prediction*
  has it (so "left left" scores 1.0 against "left lung" there, 0.5 here); ours clips it.

Reports (``report``, ``describe``: MMedPO's IU-Xray / MIMIC rows), corpus-level over the split:
BLEU-1..4 (torchmetrics ``BLEUScore``, uniform n-gram weights, brevity penalty, no smoothing,
on the normalised tokens) and ROUGE-L F1 (torchmetrics ``ROUGEScore``, the mean of the
per-report scores). METEOR is left out: no well-kept library here computes it without data
downloaded at run time (nltk's ``meteor_score`` needs the WordNet corpus, fetched with
``nltk.download``), and torchmetrics has none.
"""

from __future__ import annotations

import re
from collections import Counter

from torchmetrics.text import BLEUScore, ROUGEScore

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def tokens(text: str) -> list[str]:
    """Lower-case word tokens without punctuation or articles (``parse.normalise_short``'s)."""
    t = re.sub(r"[^\w\s]", " ", str(text or "").lower())
    return _ARTICLES.sub(" ", t).split()


def open_scores(prediction: str, reference: str) -> tuple[bool, float]:
    """(exact match, token recall) of an open answer; a reference without tokens scores (False, 0.0)."""
    pred, ref = tokens(prediction), tokens(reference)
    if not ref:
        return False, 0.0
    have = Counter(pred)
    hit = sum(min(k, have[w]) for w, k in Counter(ref).items())
    return pred == ref, hit / len(ref)


class ReportScores:
    """Corpus BLEU-1..4 and mean ROUGE-L F1 over the reports added with ``update``."""

    def __init__(self, **kw):
        self.bleu = [BLEUScore(n_gram=n, **kw) for n in (1, 2, 3, 4)]
        self.rouge = ROUGEScore(rouge_keys=("rougeL",), **kw)
        self.n = 0

    def update(self, prediction: str, reference: str) -> None:
        pred, ref = " ".join(tokens(prediction)), " ".join(tokens(reference))
        for b in self.bleu:
            b.update([pred], [[ref]])
        self.rouge.update([pred], [ref])
        self.n += 1

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            return {f"bleu{n}": float("nan") for n in (1, 2, 3, 4)} | {"rouge_l": float("nan")}
        out = {f"bleu{n}": float(b.compute()) for n, b in zip((1, 2, 3, 4), self.bleu)}
        out["rouge_l"] = float(self.rouge.compute()["rougeL_fmeasure"])
        return out
