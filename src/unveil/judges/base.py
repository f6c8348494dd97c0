"""The judge contract, the default offline judge (reference overlap) and ``build_judge``."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"[a-z0-9]+")
_NEG = re.compile(r"\b(no|not|without|absent|negative|normal)\b")


class JudgeItem(tuple):
    """``(question, reference, answer)`` with the sample's image paths as ``.images``: a plain
    3-tuple to a judge that reads no image (``for q, ref, ans in items`` keeps working)."""

    def __new__(cls, question: str, reference: str, answer: str, images: Sequence[str] = ()):
        obj = super().__new__(cls, (question, reference, answer))
        obj.images = tuple(str(p) for p in images or ())
        return obj

    def __getnewargs__(self):
        return (*self, self.images)


def as_item(x) -> JudgeItem:
    """A JudgeItem from a JudgeItem or a ``(question, reference, answer[, images])`` tuple."""
    if isinstance(x, JudgeItem):
        return x
    x = tuple(x)
    if len(x) not in (3, 4):
        raise ValueError(f"a judge item is (question, reference, answer[, images]), got {len(x)} fields")
    return JudgeItem(*x)


class Judge:
    """Scores (question, reference, answer) items in [0, 1]. Never raises on model text.

    Implementations override ``score_batch``; a judge that cannot score an item (endpoint
    down, deadline passed, unparsable reply) returns NaN for it, and callers decide what NaN
    means. Items are :class:`JudgeItem` (or plain 3-tuples); a judge that looks at images reads
    ``item.images``. ``score_pairs`` scores two answers to one question (STLLaVA-Med's
    preference); the default scores each on its own. ``submit`` starts the work and returns a
    handle whose ``result()`` gives the scores: judges that call out (HTTP) start the requests
    there, so a caller can do other work before it needs them; the default scores at once.
    """

    name = "judge"
    sees_images = False
    rubric = None

    def score(self, question: str, reference: str, answer: str, images: Sequence[str] = ()) -> float:
        return self.score_batch([JudgeItem(question, reference, answer, images)])[0]

    def score_batch(self, items: Sequence[tuple]) -> list[float]:
        raise NotImplementedError

    def score_pairs(self, pairs: Sequence[tuple[JudgeItem, str]]) -> list[tuple[float, float]]:
        """``(item, other_answer)`` -> (score of item.answer, score of other_answer)."""
        flat = []
        for it, other in pairs:
            it = as_item(it)
            flat += [it, JudgeItem(it[0], it[1], other, it.images)]
        s = self.score_batch(flat) if flat else []
        return [(s[2 * i], s[2 * i + 1]) for i in range(len(pairs))]

    def submit(self, items: Sequence[tuple]) -> Done:
        return Done(self.score_batch(items))


class Done:
    """A finished ``submit``: ``result()`` returns the scores; no failures are counted here."""

    def __init__(self, scores: list[float]):
        self.scores, self.failures = list(scores), Counter()

    def result(self) -> list[float]:
        return self.scores


def _tokens(text: str) -> list[str]:
    # Box coordinates are scored by the localisation head, not here: drop bare numbers.
    return [w for w in _WORD.findall(str(text).lower()) if not w.isdigit()]


class OverlapJudge(Judge):
    """Offline default: token F1 between answer and reference, times a negation agreement term.

    Cheap and deterministic; "no abnormality" vs "abnormality detected" share words but
    disagree on negation, which the agreement factor catches. It reads no image.
    """

    name = "overlap"

    def __init__(self, negation_penalty: float = 0.5):
        self.negation_penalty = float(negation_penalty)

    def score_batch(self, items):
        out = []
        for item in items:
            _q, ref, ans = tuple(item)[:3]
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


DEFAULT = {"_target_": "unveil.judges.base.OverlapJudge"}
# what `kind:` used to name: only for the error that tells a user what to write instead
_RENAMED = {
    "overlap": "unveil.judges.base.OverlapJudge",
    "hf": "unveil.judges.hf.HFJudge",
    "openai": "unveil.judges.openai_compat.OpenAIJudge",
}


def check_judge_config(cfg: dict, where: str = "judge") -> type:
    """The judge class a config names; a ValueError naming ``where`` for ``kind:``, a missing or
    unimportable ``_target_``, or a key the class does not take."""
    if "kind" in cfg and "_target_" not in cfg:
        kind = cfg["kind"]
        hint = _RENAMED.get(kind, "<module.Class>")
        raise ValueError(
            f"{where}: `kind: {kind}` is no longer read; judges are plugged in with `_target_` "
            f"(write `_target_: {hint}` instead of `kind: {kind}`)"
        )
    if "_target_" not in cfg:
        raise ValueError(
            f"{where}: a judge config needs `_target_` (e.g. {DEFAULT['_target_']}), got keys {list(cfg)}"
        )
    from unveil.utils.plug import check_keys, locate

    cls = locate(cfg["_target_"], where)
    check_keys(cls, cfg, where)
    return cls


def check_judges(cfg, where: str) -> None:
    """Check every judge config inside ``cfg`` (a plain dict/list tree: a reward head's or a
    builder's config), found under a ``judge`` key or in a ``judges`` list, before Hydra
    instantiates it: so a typo names the config path and the key, not a constructor's TypeError."""
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            w = f"{where}.{k}"
            if k == "judge" and isinstance(v, dict):
                check_judge_config(v, w)
            elif k == "judges" and isinstance(v, list):
                for i, j in enumerate(v):
                    if isinstance(j, dict):
                        check_judge_config(j, f"{w}[{i}]")
            else:
                check_judges(v, w)
    elif isinstance(cfg, list):
        for i, v in enumerate(cfg):
            check_judges(v, f"{where}[{i}]")


def build_judge(cfg=None, where: str = "judge") -> Judge:
    """A judge from ``{_target_: <class path>, <its options>}`` (Hydra's plug-in mechanism, as
    rewards, builders and callbacks use), or a ready object with ``score_batch`` (Hydra
    instantiates a nested ``_target_`` before a head or builder sees it). ``None``: the offline
    overlap judge. A key the class does not take is an error naming it."""
    if cfg is None:
        cfg = DEFAULT
    if hasattr(cfg, "score_batch"):
        return cfg
    if hasattr(cfg, "items") and not isinstance(cfg, dict):  # a DictConfig
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg)
    check_judge_config(cfg, where)
    import hydra.utils
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(cfg, _convert_="all")
    except InstantiationException as e:  # a bad value (rubric, api_key_env, ...): the judge's own message
        if isinstance(e.__cause__, (ValueError, TypeError)):
            raise ValueError(f"{where}: {e.__cause__}") from e.__cause__
        raise
