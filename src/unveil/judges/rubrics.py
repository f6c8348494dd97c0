"""Rubrics: what a judge is asked and how its reply is read, one yaml per paper.

``rubric:`` in a judge's config is a name (``stllava_preference``, ``mmedpo_clinical_relevance``,
``umed_relevance``: the files in ``judges/rubrics/``), a path to such a yaml, or the fields inline.

Fields: ``mode`` (``single``: one answer -> one score; ``pair``: two answers -> two scores),
``template`` with the placeholders ``{question}``, ``{reference}``, ``{answer}`` (single) or
``{answer_1}``, ``{answer_2}`` (pair) (other braces are left as they are), ``system`` (optional),
``images`` (send the sample's images), ``scale`` (a score ``s`` becomes ``s / scale``),
``temperature`` and ``max_tokens`` (the request's defaults).

Reading a reply, in order (:func:`parse_score`): a JSON object with a ``score`` (or ``rating``,
``relevance``) field; a fraction (``7/10``, ``7 out of 10``: numerator / denominator); else the
first number, divided by ``scale``. A number outside ``[0, scale]``, or no number: NaN, never 0.
Pairs (:func:`parse_pair`): a JSON object with two scores, else the first line's two numbers
(STLLaVA-Med's official parser reads the first line the same way); otherwise (NaN, NaN).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

RUBRIC_DIR = Path(__file__).with_name("rubrics")
_NUM = r"[-+]?\d+(?:\.\d+)?"
_FRACTION = re.compile(rf"(?<![\d.])({_NUM})\s*(?:/|out of)\s*(\d+(?:\.\d+)?)", re.I)
_NUMBER = re.compile(rf"(?<![\d.\w])({_NUM})(?![\d])")
_JSON = re.compile(r"\{[^{}]*\}", re.S)
_SCORE_KEYS = ("score", "rating", "relevance", "clinical_relevance", "grade")
NAN = float("nan")


@dataclass(frozen=True)
class Rubric:
    name: str
    template: str
    mode: str = "single"
    system: str | None = None
    images: bool = True
    scale: float = 10.0
    temperature: float = 0.0
    max_tokens: int = 16

    def __post_init__(self):
        if self.mode not in ("single", "pair"):
            raise ValueError(f"rubric {self.name!r}: mode must be single or pair, got {self.mode!r}")
        need = ("{answer}",) if self.mode == "single" else ("{answer_1}", "{answer_2}")
        missing = [p for p in need if p not in self.template]
        if missing:
            raise ValueError(f"rubric {self.name!r} ({self.mode}): template lacks {', '.join(missing)}")
        if not float(self.scale) > 0:
            raise ValueError(f"rubric {self.name!r}: scale must be > 0, got {self.scale}")

    def render(self, question: str, reference: str, *answers: str) -> str:
        """The user text: placeholders replaced; every other brace is left alone."""
        if len(answers) != (1 if self.mode == "single" else 2):
            raise ValueError(f"rubric {self.name!r} ({self.mode}) got {len(answers)} answer(s)")
        names = ("answer",) if self.mode == "single" else ("answer_1", "answer_2")
        values = {"question": question, "reference": reference, **dict(zip(names, answers))}
        return re.sub(r"\{(\w+)\}", lambda m: str(values.get(m.group(1), m.group(0))), self.template)

    def parse(self, text) -> float:
        return parse_score(text, self.scale)

    def parse_pair(self, text) -> tuple[float, float]:
        return parse_pair(text, self.scale)

    def config(self) -> dict:
        return asdict(self)


def load_rubric(spec) -> Rubric:
    """A :class:`Rubric` from a name, a yaml path, a dict of fields, or a Rubric."""
    if isinstance(spec, Rubric):
        return spec
    if isinstance(spec, str):
        path = Path(spec) if spec.endswith((".yaml", ".yml")) else RUBRIC_DIR / f"{spec}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in RUBRIC_DIR.glob("*.yaml"))
            raise ValueError(f"judge rubric {spec!r}: no such file {path}; built-in rubrics: {known}")
        data = yaml.safe_load(path.read_text())
        where = str(path)
    elif isinstance(spec, dict) or hasattr(spec, "items"):
        data, where = dict(spec), "inline rubric"
    else:
        raise TypeError(f"judge rubric must be a name, a yaml path or a mapping, got {type(spec).__name__}")
    known = {f.name for f in fields(Rubric)}
    bad = sorted(set(data) - known)
    if bad:
        raise ValueError(f"{where}: unknown rubric field(s) {bad}; known: {sorted(known)}")
    data.setdefault("name", Path(where).stem if where != "inline rubric" else "inline")
    return Rubric(**data)


def _in_range(v: float, scale: float) -> float:
    return v / scale if math.isfinite(v) and 0.0 <= v <= scale else NAN


def _json_objects(text: str):
    for m in _JSON.finditer(text):
        try:
            obj = json.loads(m.group(0))
        except ValueError:
            continue
        if isinstance(obj, dict):
            yield obj


def _as_float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return NAN


def parse_score(text, scale: float = 10.0) -> float:
    """A judge's reply -> a score in [0, 1]; NaN when it holds no usable number."""
    if not isinstance(text, str):
        return NAN
    for obj in _json_objects(text):
        for k in _SCORE_KEYS:
            if k in obj:
                return _in_range(_as_float(obj[k]), scale)
    m = _FRACTION.search(text)
    if m:
        num, den = float(m.group(1)), float(m.group(2))
        return num / den if den > 0 and 0 <= num <= den else NAN
    m = _NUMBER.search(text)
    return _in_range(float(m.group(1)), scale) if m else NAN


def parse_pair(text, scale: float = 10.0) -> tuple[float, float]:
    """A pairwise reply -> two scores in [0, 1] (NaN, NaN when they cannot be read)."""
    if not isinstance(text, str):
        return NAN, NAN
    for obj in _json_objects(text):
        vals = obj.get("scores")
        if not (isinstance(vals, list) and len(vals) == 2):
            keys = [k for k in obj if re.search(r"(1|2|a|b)$", str(k).lower())]
            vals = [obj[k] for k in sorted(keys)[:2]] if len(keys) >= 2 else None
        if vals:
            return _in_range(_as_float(vals[0]), scale), _in_range(_as_float(vals[1]), scale)
    first = text.strip().split("\n")[0].replace(",", " ")
    nums = re.findall(rf"(?<![\w.]){_NUM}(?![\w.])", first)
    if len(nums) != 2:
        return NAN, NAN
    return _in_range(float(nums[0]), scale), _in_range(float(nums[1]), scale)
