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

Visual pairs (rejected images differ): the localiser's own confidence when the lesion-noise
builder recorded one (``confidence_field``, ``curate_localiser_confidence``: a heat map's disease
probability, or how concentrated the policy's attention is in the noised region), as MMedPO
weights a visual pair by its localiser's disease probability; otherwise
``scorer(sample) -> float in [0, 1]`` (NaN when it cannot tell), a pluggable callable
(``_target_`` in the config). The default :class:`LesionContrastScorer` is an offline,
training-free proxy for ground-truth-box pairs; see its docstring for what it measures. A pair that differs
in both text and image gets the product of the two.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from unveil.curate.common import BaseBuilder, Context, Outcome, make_judge, rejected_answer, user_query
from unveil.data.schema import IMAGE_PLACEHOLDER, Rejected, Sample
from unveil.judges.base import JudgeItem

log = logging.getLogger(__name__)

MAX_ROUNDS = 5


def agreement_score(
    score_fns: Sequence[Callable[[], float]], tolerance: float = 0.1, max_rounds: int = MAX_ROUNDS
) -> tuple[float, int, list[float]]:
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

    It measures how much of the lesion's visible contrast the noised copy removed. Inside each
    ground-truth box the real image holds the lesion and, around it, background (a box is
    the lesion's bounding rectangle): the lesion's contrast pattern is ``t = real - mean(real)``
    over the box's pixels. The share of that pattern still present in the noised image is the
    regression slope ``kept = cov(t, noised) / var(t)`` (1: untouched; 0.5: the lesion is
    there at half its contrast; about 0: nothing of it is left, whatever noise replaced it;
    independent noise adds no covariance, so a visible noise patch is not mistaken for the
    lesion). The score is ``clip(1 - kept, 0, 1)`` averaged over boxes: high when the
    noised image no longer shows the disease (the pair cleanly contrasts "lesion visible"
    with "lesion gone"), low when it still shows it (the ground-truth answer is then still
    right for the noised image, so the pair should count little). For the diffusion noise
    ``kept`` is about ``sqrt(a_k)`` before clipping to the pixel range. Boxes whose pattern
    has a standard deviation below ``min_std`` grey levels (a flat box) are ignored. No
    localisation or IoU is involved. NaN when there is no usable box (a normal study).
    """

    def __init__(self, min_std: float = 2.0):
        self.min_std = float(min_std)

    @staticmethod
    def _box(shape, box):
        h, w = shape
        x1, y1 = int(box[0] * w), int(box[1] * h)
        x2, y2 = max(int(math.ceil(box[2] * w)), x1 + 1), max(int(math.ceil(box[3] * h)), y1 + 1)
        return slice(y1, y2), slice(x1, x2)

    def kept(self, real: np.ndarray, noised: np.ndarray, box) -> float:
        """Share of the lesion's contrast pattern in ``box`` still present in ``noised`` (NaN if flat)."""
        ys, xs = self._box(real.shape, box)
        t = real[ys, xs].astype(np.float64).ravel()
        n = noised[ys, xs].astype(np.float64).ravel()
        t = t - t.mean()
        if t.size < 2 or t.std() < self.min_std:
            return float("nan")
        return float(np.dot(t, n - n.mean()) / np.dot(t, t))

    def __call__(self, sample: Sample) -> float:
        from unveil.curate.lesion_noise import read_image

        if not sample.boxes or sample.rejected is None or not sample.rejected.images:
            return float("nan")

        def grey(a: np.ndarray) -> np.ndarray:
            return a.astype(np.float32).mean(-1) if a.ndim == 3 else a.astype(np.float32)

        cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        vals = []
        for box, k in zip(sample.boxes, sample.box_images):
            if k not in cache:
                cache[k] = (grey(read_image(sample.images[k])), grey(read_image(sample.rejected.images[k])))
            real, noised = cache[k]
            if real.shape != noised.shape:
                continue
            kept = self.kept(real, noised, box)
            if math.isfinite(kept):
                vals.append(min(max(1.0 - kept, 0.0), 1.0))
        return float(np.mean(vals)) if vals else float("nan")


class RelevanceWeightBuilder(BaseBuilder):
    """Reads preference records (output of another builder) and writes them with ``weight``."""

    name = "relevance_weights"

    def __init__(
        self,
        judges: list[dict] | None = None,
        tolerance: float = 0.1,
        max_rounds: int = MAX_ROUNDS,
        scorer: Callable[[Sample], float] | None = None,
        on_failure: float = 1.0,
        keep_unpaired: bool = False,
        confidence_field: str | None = "curate_localiser_confidence",
    ):
        super().__init__()
        self.confidence_field = confidence_field
        self.judge_cfgs = list(judges or [None])
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
            self._judges = [make_judge(c, f"builder.judges[{i}]") for i, c in enumerate(self.judge_cfgs)]
            for i, j in enumerate(self._judges):
                if getattr(getattr(j, "rubric", None), "mode", "single") != "single":
                    raise ValueError(
                        f"builder.judges[{i}]: rubric {j.rubric.name!r} compares two answers; "
                        "relevance weights score one (e.g. rubric: mmedpo_clinical_relevance)"
                    )
        return self._judges

    def text_weight(self, s: Sample) -> tuple[float, int, list[float]]:
        q = user_query(s).replace(IMAGE_PLACEHOLDER, "").strip()
        item = JudgeItem(q, s.target, rejected_answer(s), s.images)  # a judge that sees gets the chosen image
        fns = [lambda j=j: j.score_batch([item])[0] for j in self.judges()]
        return agreement_score(fns, self.tolerance, self.max_rounds)

    def visual_weight(self, s: Sample) -> tuple[float, str]:
        """(weight, where it came from): the localiser's confidence if the pair carries one, else the scorer."""
        conf = s.meta.get(self.confidence_field) if self.confidence_field else None
        if isinstance(conf, (int, float)) and math.isfinite(conf):
            self.stats["visual/from_localiser"] += 1
            return float(conf), "localiser"
        return float(self.scorer(s)), "scorer"

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
                vw, source = self.visual_weight(s)
                meta.update(weight_visual=vw if math.isfinite(vw) else None, weight_visual_source=source)
                if not math.isfinite(vw):
                    self.stats["visual/scorer_failed"] += 1
                    vw = self.on_failure
                self.stats["visual/pairs"] += 1
                w *= min(max(vw, 0.0), 1.0)
            s.weight = float(min(max(w, 0.0), 1.0))
            s.meta.update(meta)
            yield Outcome(s)
