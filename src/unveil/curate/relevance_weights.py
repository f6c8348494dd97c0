"""Clinical-relevance weights for preference pairs (MMedPO). Writes the raw weight in [0, 1].

The DPO stage turns raw weights into loss weights (the released code multiplies by the raw
score; the paper rescales to mean 1 and clips to [0.75, 1.25]); this builder never
normalises.

Text pairs (rejected answer differs, same image): several judges score in turn how close
the dispreferred answer is to the reference, i.e. how plausible, clinically relevant a
hallucination it is: a near miss (right finding, wrong side) is a harder and more useful
negative than noise. Judges take turns (the list is cycled) until two consecutive scores
agree within ``tolerance``; the weight is then the mean of those two. After ``max_rounds``
(at most 5) without agreement it is the mean of all scores. A round whose judge fails (NaN)
counts as a round but adds no score; with no score at all the pair gets ``on_failure``.

Visual pairs (rejected images differ): ``scorer(sample) -> float in [0, 1]`` (NaN when it
cannot tell), a pluggable callable (``_target_`` in the config), standing in for MMedPO's
visual tool and its disease probability. The default :class:`LesionContrastScorer` is an
offline, training-free proxy; see its docstring for what it measures. A pair that differs
in both text and image gets the product of the two.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterator, Sequence

import numpy as np

from unveil.curate.common import BaseBuilder, Context, Outcome, make_judge, rejected_answer, user_query
from unveil.data.schema import IMAGE_PLACEHOLDER, Rejected, Sample

log = logging.getLogger(__name__)

MAX_ROUNDS = 5


def agreement_score(score_fns: Sequence[Callable[[], float]], tolerance: float = 0.1,
                    max_rounds: int = MAX_ROUNDS) -> tuple[float, int, list[float]]:
    """Ask scorers in turn (cycled) until two consecutive scores agree within ``tolerance``.

    Returns (weight, rounds used, scores). Agreement -> mean of the agreeing pair; no
    agreement after ``max_rounds`` -> mean of all scores; no finite score -> NaN.
    """
    if not score_fns:
        raise ValueError("need at least one judge")
    max_rounds = max(1, min(int(max_rounds), MAX_ROUNDS))
    scores: list[float] = []
    prev: float | None = None
    for r in range(max_rounds):
        s = float(score_fns[r % len(score_fns)]())
        if not math.isfinite(s):
            prev = None  # a failed round breaks the chain of consecutive scores
            continue
        s = min(max(s, 0.0), 1.0)
        scores.append(s)
        if prev is not None and abs(s - prev) <= tolerance:
            return (s + prev) / 2.0, r + 1, scores
        prev = s
    return (float(np.mean(scores)) if scores else float("nan")), max_rounds, scores


class LesionContrastScorer:
    """Offline stand-in for a visual tool's disease probability on a visual pair.

    It measures how much of the lesion's visible evidence the noised copy removed. For each
    ground-truth box, the lesion's conspicuity in an image is the contrast
    ``|mean(box) - mean(ring)| / (std(ring in the real image) + eps)``, the ring being a band
    of ``ring`` box sizes around the box. With ``c_real`` and ``c_noised`` that contrast in
    the real and the noised image, the score is ``clip(1 - c_noised / c_real, 0, 1)``
    averaged over boxes: 1 when the lesion is no longer distinguishable from its
    surroundings (the pair cleanly contrasts "lesion visible" with "lesion gone"), 0 when it
    is as visible as before (the ground-truth answer is still right for the noised image, so
    the pair should count little). Boxes whose real contrast is below ``min_contrast`` carry
    no evidence to remove and are ignored. No localisation or IoU is involved. NaN when
    there is no box (a normal study) or no usable box.
    """

    def __init__(self, ring: float = 0.5, min_contrast: float = 0.25, eps: float = 1e-3):
        self.ring, self.min_contrast, self.eps = float(ring), float(min_contrast), float(eps)

    def _regions(self, shape, box):
        h, w = shape
        x1, y1, x2, y2 = int(box[0] * w), int(box[1] * h), int(math.ceil(box[2] * w)), int(math.ceil(box[3] * h))
        x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
        pw, ph = max(1, int(round((x2 - x1) * self.ring))), max(1, int(round((y2 - y1) * self.ring)))
        inner = np.zeros(shape, bool)
        inner[y1:y2, x1:x2] = True
        outer = np.zeros(shape, bool)
        outer[max(0, y1 - ph):min(h, y2 + ph), max(0, x1 - pw):min(w, x2 + pw)] = True
        return inner, outer & ~inner

    def contrast(self, img: np.ndarray, inner, ring, ref_std: float) -> float:
        return abs(float(img[inner].mean()) - float(img[ring].mean())) / (ref_std + self.eps)

    def __call__(self, sample: Sample) -> float:
        from unveil.curate.lesion_noise import read_image

        if not sample.boxes or sample.rejected is None or not sample.rejected.images:
            return float("nan")
        vals = []
        cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for box, k in zip(sample.boxes, sample.box_images):
            if k not in cache:
                real, noised = read_image(sample.images[k]), read_image(sample.rejected.images[k])
                to_f = lambda a: a.astype(np.float32).mean(-1) if a.ndim == 3 else a.astype(np.float32)
                cache[k] = (to_f(real), to_f(noised))
            real, noised = cache[k]
            inner, ring = self._regions(real.shape, box)
            if not ring.any():
                continue
            ref_std = float(real[ring].std())
            c_real = self.contrast(real, inner, ring, ref_std)
            if c_real < self.min_contrast:
                continue
            c_noised = self.contrast(noised, inner, ring, ref_std)
            vals.append(min(max(1.0 - c_noised / c_real, 0.0), 1.0))
        return float(np.mean(vals)) if vals else float("nan")


class RelevanceWeightBuilder(BaseBuilder):
    """Reads preference records (output of another builder) and writes them with ``weight``."""

    name = "relevance_weights"

    def __init__(self, judges: list[dict] | None = None, tolerance: float = 0.1, max_rounds: int = MAX_ROUNDS,
                 scorer: Callable[[Sample], float] | None = None, on_failure: float = 1.0, keep_unpaired: bool = False):
        super().__init__()
        self.judge_cfgs = list(judges or [{"kind": "overlap"}])
        if not self.judge_cfgs:
            raise ValueError("builder.judges: give at least one judge config")
        self.tolerance, self.max_rounds = float(tolerance), int(max_rounds)
        if not 1 <= self.max_rounds <= MAX_ROUNDS:
            raise ValueError(f"builder.max_rounds must be in [1, {MAX_ROUNDS}], got {max_rounds}")
        self.scorer = scorer if scorer is not None else LesionContrastScorer()
        if not callable(self.scorer):
            raise TypeError(f"builder.scorer must be callable(sample) -> float, got {type(self.scorer).__name__}")
        self.on_failure, self.keep_unpaired = float(on_failure), bool(keep_unpaired)
        self._judges = None

    def judges(self):
        if self._judges is None:
            self._judges = [make_judge(c) for c in self.judge_cfgs]
        return self._judges

    def text_weight(self, s: Sample) -> tuple[float, int, list[float]]:
        q = user_query(s).replace(IMAGE_PLACEHOLDER, "").strip()
        item = (q, s.target, rejected_answer(s))
        fns = [lambda j=j: j.score_batch([item])[0] for j in self.judges()]
        return agreement_score(fns, self.tolerance, self.max_rounds)

    def run(self, samples: list[Sample], ctx: Context) -> Iterator[Outcome]:
        for s in samples:
            ctx.advance(1)
            rj: Rejected | None = s.rejected
            text_pair = rj is not None and rejected_answer(s).strip() != s.target.strip()
            visual_pair = rj is not None and rj.images is not None and list(rj.images) != list(s.images)
            if not (text_pair or visual_pair):
                if self.keep_unpaired:
                    yield Outcome(s)
                else:
                    yield Outcome(skipped="not_a_preference_pair")
                continue
            w, meta = 1.0, {}
            if text_pair:
                tw, rounds, scores = self.text_weight(s)
                meta.update(weight_rounds=rounds, weight_scores=[round(x, 4) for x in scores])
                self.stats[f"text/rounds_{rounds}"] += 1
                if not math.isfinite(tw):
                    self.stats["text/judge_failed"] += 1
                    tw = self.on_failure
                w *= tw
            if visual_pair:
                vw = float(self.scorer(s))
                meta["weight_visual"] = vw if math.isfinite(vw) else None
                if not math.isfinite(vw):
                    self.stats["visual/scorer_failed"] += 1
                    vw = self.on_failure
                self.stats["visual/pairs"] += 1
                w *= min(max(vw, 0.0), 1.0)
            s.weight = float(min(max(w, 0.0), 1.0))
            s.meta.update(meta)
            yield Outcome(s)
