"""Text dispreferred answers (MMedPO): plausible hallucinations against the ground truth.

Two ways to get the dispreferred answer of a (image, query, reference) triple:

- ``sampler=model``: sample N answers from the target model (``model`` config group, e.g.
  ``model.init_from=<SFT run>``), let a judge score each against the reference in [0, 1]
  and keep the lowest-scoring one. Only well-formed samples compete (``plausible_only``, see
  :func:`plausible`: broken fragments of a weak model are no plausible hallucination); so when
  the model invents a box and finding on a normal study, that answer is the rejected one. When
  no sample is clearly wrong (every score at or above ``wrong_below``, or nothing usable was
  sampled) a rule writes one instead (on a normal study only ``negation`` applies: a box and a
  finding invented on it).
- ``sampler=rules``: no model at all; a rule writes a plausible wrong answer:
  ``wrong_finding`` (another finding type of the vocabulary), ``mirror`` (left <-> right:
  boxes mirrored horizontally, the words swapped), ``wrong_box`` (box shifted/scaled until
  its IoU with every ground-truth box is below ``max_iou``), ``negation`` (abnormal <->
  normal, yes <-> no). Rules that do not apply to an answer (no box to move, no finding to
  swap) are passed over; the order is drawn per sample from the seed.
- ``sampler=auto`` (default): ``model`` when the model config names trained weights
  (``model.init_from`` or ``model=hf``), else ``rules``.

Boxes in answers are on the 0-100 grid of record files; model output is converted to it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator

import numpy as np

from unveil.curate.common import (
    CANON,
    BaseBuilder,
    Context,
    Outcome,
    clean_text,
    make_judge,
    rng_for,
    to_canonical,
    user_query,
    with_rejected,
)
from unveil.data.boxes import iou_matrix
from unveil.data.schema import IMAGE_PLACEHOLDER, Sample
from unveil.judges.base import JudgeItem

log = logging.getLogger(__name__)

RULES = ("wrong_finding", "mirror", "wrong_box", "negation")
NORMAL_ANSWER = "No abnormality detected. The study appears normal."
_NORMAL = re.compile(
    r"\b(no (abnormalit\w*|acute|significant|evidence|lesions?|findings?)|normal|unremarkable|"
    r"within normal limits|negative)\b",
    re.I,
)
_YESNO = re.compile(r"^\s*(yes|no)\b(.*)$", re.I | re.S)
_SIDES = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}
_SIDE_RE = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b")


# --- the rules: (reference text, context) -> wrong text, or None when the rule does not apply ---


def is_normal(text: str) -> bool:
    """Does an answer state a normal study (or answer 'no')?"""
    m = _YESNO.match(text)
    if m and len(text.split()) <= 3:
        return m.group(1).lower() == "no"
    return bool(_NORMAL.search(text)) and not CANON.parse(text)


def _random_box(rng: np.random.Generator, avoid: list | None = None, max_iou: float = 0.5) -> list[float]:
    for _ in range(100):
        w, h = rng.uniform(0.08, 0.25, size=2)
        x1, y1 = rng.uniform(0.1, 0.9 - w), rng.uniform(0.1, 0.9 - h)
        b = [x1, y1, x1 + w, y1 + h]
        if not avoid or iou_matrix([b], avoid).max() < max_iou:
            return b
    return b


def negation(
    text: str, rng: np.random.Generator, vocab: list[str], max_iou: float = 0.5, normal_answer: str = NORMAL_ANSWER
) -> str | None:
    m = _YESNO.match(text)
    if m and len(text.split()) <= 3:  # closed answer: yes <-> no, keeping case and punctuation
        word = m.group(1)
        flip = {"yes": "no", "no": "yes"}[word.lower()]
        flip = flip.capitalize() if word[0].isupper() else flip
        return flip + m.group(2)
    if is_normal(text):
        finding = vocab[int(rng.integers(len(vocab)))] if vocab else "lesion"
        return f"Abnormality detected. Region {CANON.format_box(_random_box(rng))}: {finding}."
    return normal_answer


def wrong_finding(text: str, rng: np.random.Generator, vocab: list[str], **_) -> str | None:
    if len(vocab) < 2:
        return None
    pat = re.compile(r"\b(" + "|".join(re.escape(v) for v in sorted(vocab, key=len, reverse=True)) + r")\b", re.I)
    found = sorted({m.group(1).lower() for m in pat.finditer(text)})
    if not found:
        return None
    swap = {}
    for f in found:
        others = [v for v in vocab if v.lower() != f]
        swap[f] = others[int(rng.integers(len(others)))]

    def sub(m):
        w = swap[m.group(1).lower()]
        return w.capitalize() if m.group(1)[0].isupper() else w

    return pat.sub(sub, text)


def _replace_boxes(text: str, spans, boxes) -> str:
    out, last = [], 0
    for p, b in zip(spans, boxes):
        out += [text[last : p.start], CANON.format_box(b)]
        last = p.end
    return "".join(out) + text[last:]


def _grid(boxes) -> list[list[float]]:
    """Boxes as they will read back from text (quantised to the 0-100 grid)."""
    return [list(b) for b in CANON.parse(CANON.format(boxes))] if boxes else []


def mirror(text: str, rng: np.random.Generator, vocab: list[str], max_iou: float = 0.5, **_) -> str | None:
    spans = CANON.parse_spans(text)
    new = _SIDE_RE.sub(lambda m: _SIDES[m.group(1)], text)
    if spans:
        gt = [p.box for p in spans]
        mirrored = [[1 - b[2], b[1], 1 - b[0], b[3]] for b in gt]
        if iou_matrix(_grid(mirrored), gt).max() >= max_iou:  # a central lesion mirrors onto itself
            return None
        new = _SIDE_RE.sub(lambda m: _SIDES[m.group(1)], _replace_boxes(text, spans, mirrored))
    return new if new != text else None


def wrong_box(text: str, rng: np.random.Generator, vocab: list[str], max_iou: float = 0.5, **_) -> str | None:
    spans = CANON.parse_spans(text)
    if not spans:
        return None
    gt = [list(p.box) for p in spans]
    moved = []
    for b in gt:
        w, h = b[2] - b[0], b[3] - b[1]
        best = None
        for _ in range(200):
            s = rng.uniform(0.6, 1.6)  # scale
            nw, nh = min(w * s, 0.9), min(h * s, 0.9)
            ang = rng.uniform(0, 2 * np.pi)
            dist = rng.uniform(1.0, 2.0) * max(w, h)  # shift by one to two box sizes
            cx = (b[0] + b[2]) / 2 + math.cos(ang) * dist
            cy = (b[1] + b[3]) / 2 + math.sin(ang) * dist
            cx, cy = min(max(cx, nw / 2), 1 - nw / 2), min(max(cy, nh / 2), 1 - nh / 2)
            cand = [cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2]
            if iou_matrix(_grid([cand]), gt).max() < max_iou:
                best = cand
                break
        if best is None:
            best = _random_box(rng, gt, max_iou)
        moved.append(best)
    return _replace_boxes(text, spans, moved)


RULE_FNS = {"wrong_finding": wrong_finding, "mirror": mirror, "wrong_box": wrong_box, "negation": negation}


def _norm(t: str) -> str:
    return re.sub(r"\W+", " ", t.lower()).strip()


_WORDS = re.compile(r"[A-Za-z][A-Za-z' -]*[.!]?")


def plausible(answer: str, reference: str) -> bool:
    """Is a sampled answer a well-formed answer of the reference's kind, rather than broken text?

    A weak model sampled at temperature 1 writes fragments ("81, 41, The stu", "A.") that a judge
    scores lowest, yet they are no hallucination a model would be tempted by. A short reference
    (a closed answer, at most three words) needs a short all-word answer; a longer one needs
    complete boxes only (every ``[`` opens a parseable box, no digits outside boxes) and either a
    box or a statement that the study is normal, ending in a full stop.
    """
    a = answer.strip()
    if not a or "\ufffd" in a:
        return False
    if len(reference.split()) <= 3:
        return len(a.split()) <= 3 and bool(_WORDS.fullmatch(a))
    spans = CANON.parse_spans(a)
    if a.count("[") != len(spans) or a.count("]") != len(spans):
        return False
    if re.search(r"\d", _strip_spans(a, spans)) or not a.endswith("."):
        return False
    return bool(spans) or is_normal(a)


def _strip_spans(text: str, spans) -> str:
    out, last = [], 0
    for p in spans:
        out.append(text[last : p.start])
        last = p.end
    return "".join(out) + text[last:]


class HallucinationBuilder(BaseBuilder):
    """Pairs the reference answer (chosen) with a plausible wrong answer (rejected)."""

    name = "hallucination"

    def __init__(
        self,
        sampler: str = "auto",
        num_samples: int = 4,
        judge: dict | None = None,
        wrong_below: float = 0.5,
        rules: list[str] | tuple[str, ...] = RULES,
        rule_weights: dict | None = None,
        max_iou: float = 0.5,
        findings: list[str] | None = None,
        normal_answer: str = NORMAL_ANSWER,
        batch_size: int = 8,
        max_new_tokens: int = 48,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        id_suffix: str = "-txt",
        plausible_only: bool = True,
    ):
        super().__init__()
        if sampler not in ("auto", "model", "rules"):
            raise ValueError(f"builder.sampler must be auto | model | rules, got {sampler!r}")
        unknown = [r for r in rules if r not in RULE_FNS]
        if unknown or not rules:
            raise ValueError(f"unknown hallucination rule(s) {unknown}; known: {list(RULE_FNS)}")
        self.sampler, self.num_samples, self.wrong_below = sampler, int(num_samples), float(wrong_below)
        self.judge_cfg = judge
        self.rules, self.rule_weights = list(rules), dict(rule_weights or {})
        self.max_iou, self.findings, self.normal_answer = float(max_iou), findings, normal_answer
        self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
        self.temperature, self.top_p, self.top_k = float(temperature), float(top_p), int(top_k)
        self.id_suffix = id_suffix
        self.plausible_only = bool(plausible_only)
        self._judge = None

    # --- rules ---------------------------------------------------------------------------
    def rule_answer(self, s: Sample, seed: int, vocab: list[str]) -> tuple[str, str] | None:
        """(rule name, wrong answer) for a sample, or None when no rule applies."""
        rng = rng_for(seed, "hallucination", s.id)
        rules = [r for r in self.rules if float(self.rule_weights.get(r, 1.0)) > 0]  # weight 0 = never
        w = np.array([float(self.rule_weights.get(r, 1.0)) for r in rules])
        order = list(rng.choice(len(rules), size=len(rules), replace=False, p=w / w.sum())) if rules else []
        ref = s.target
        for i in order:
            rule = rules[i]
            out = (
                RULE_FNS[rule](ref, rng, vocab, max_iou=self.max_iou, normal_answer=self.normal_answer)
                if rule == "negation"
                else RULE_FNS[rule](ref, rng, vocab, max_iou=self.max_iou)
            )
            if out is not None and _norm(out) != _norm(ref):
                return rule, out
        return None

    # --- model sampling --------------------------------------------------------------------
    def judge(self):
        if self._judge is None:
            self._judge = make_judge(self.judge_cfg)
        return self._judge

    def use_model(self, ctx: Context) -> bool:
        if self.sampler != "auto":
            return self.sampler == "model"
        m = ctx.model_cfg
        from unveil.models.factory import loads_a_checkpoint

        return m is not None and (bool(m.get("init_from")) or loads_a_checkpoint(m))

    def sample_answers(self, chunk: list[Sample], ctx: Context) -> list[list[str]]:
        from unveil.data.collate import PromptCollator
        from unveil.data.frames import answer_frame
        from unveil.models.generation import generate

        bb = ctx.backbone()
        batch = PromptCollator(bb)(chunk)
        batch = {k: v.to(ctx.device) if hasattr(v, "to") else v for k, v in batch.items()}
        out = generate(
            bb,
            batch,
            max_new_tokens=self.max_new_tokens,
            do_sample=True,
            num_return_sequences=self.num_samples,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
        )
        n = self.num_samples
        frames = [answer_frame(bb, s) for s in chunk for _ in range(n)]  # back to the original image
        texts = [clean_text(to_canonical(t, bb.box_format, f)) for t, f in zip(out["texts"], frames)]
        return [texts[i * n : (i + 1) * n] for i in range(len(chunk))]

    def _model_picks(self, chunk: list[Sample], ctx: Context) -> list[tuple[str, float] | None]:
        """Per sample, the sampled wrong answer the judge scores lowest, with its score (None: no candidate)."""
        picks: list[tuple[str, float] | None] = [None] * len(chunk)
        answers = self.sample_answers(chunk, ctx)
        items, owners = [], []
        for i, (s, group) in enumerate(zip(chunk, answers)):
            q = user_query(s).replace(IMAGE_PLACEHOLDER, "").strip()
            for a in group:
                if not a or _norm(a) == _norm(s.target):
                    continue
                if self.plausible_only and not plausible(a, s.target):
                    self.stats["model_samples_implausible"] += 1
                    continue
                items.append(JudgeItem(q, s.target, a, s.images))
                owners.append(i)
        scores = self.judge().score_batch(items) if items else []
        for (_q, _ref, a), i, sc in zip(items, owners, scores):
            sc = float(sc)
            if math.isfinite(sc) and (picks[i] is None or sc < picks[i][1]):
                picks[i] = (a, sc)
        return picks

    # --- the builder -----------------------------------------------------------------------
    def _outcome(self, s: Sample, pick: tuple[str, float] | None, use_model: bool, seed: int, vocab) -> Outcome:
        """The model's answer when the judge calls it wrong enough, else a rule's (keeping the judge score)."""
        if pick is not None and pick[1] < self.wrong_below:
            self.stats["source/model"] += 1
            return Outcome(
                with_rejected(
                    s,
                    answer=pick[0],
                    suffix=self.id_suffix,
                    curate_builder=self.name,
                    curate_source="model",
                    curate_rule=None,
                    curate_judge_score=pick[1],
                )
            )
        if use_model:
            self.stats["model_fallback_to_rules"] += 1
        got = self.rule_answer(s, seed, vocab)
        if got is None:
            return Outcome(skipped="no_rule_applies")
        rule, ans = got
        self.stats["source/rules"] += 1
        self.stats[f"rule/{rule}"] += 1
        return Outcome(
            with_rejected(
                s,
                answer=ans,
                suffix=self.id_suffix,
                curate_builder=self.name,
                curate_source="rules",
                curate_rule=rule,
                curate_judge_score=pick[1] if pick else None,
            )
        )

    def run(self, samples: list[Sample], ctx: Context) -> Iterator[Outcome]:
        vocab = list(self.findings) if self.findings else list(ctx.findings)
        use_model = self.use_model(ctx)
        if use_model:
            import torch

            torch.manual_seed(ctx.seed)
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start : start + self.batch_size]
            picks = self._model_picks(chunk, ctx) if use_model else [None] * len(chunk)
            for s, pick in zip(chunk, picks):
                yield self._outcome(s, pick, use_model, ctx.seed, vocab)
            ctx.advance(len(chunk))
