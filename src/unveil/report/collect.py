"""Find finished runs and group them by the overrides that differ between them.

A run is a directory with ``metrics.json`` (read through :func:`unveil.eval.runs.load_run`, so old
metric names read under the current ones). Its command-line overrides come from Hydra's
``.hydra/overrides.yaml`` (``seed=1``, ``reward=umed``, ``+trainer.foo=1``); a run without that file
has none. Runs whose overrides are equal apart from ``seed`` form one group, whose values are
folded into mean ± std over the runs.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from unveil.eval.runs import Run, load_run

FOLD = ("seed",)  # overrides folded into mean ± std rather than splitting groups


def parse_overrides(lines: Iterable[str]) -> dict[str, str]:
    """``["seed=1", "+a.b=2", "~c"]`` -> ``{"seed": "1", "a.b": "2", "c": "<deleted>"}``."""
    out = {}
    for line in lines:
        line = str(line)
        if "=" not in line:  # ~key deletes a key
            out[line.lstrip("~")] = "<deleted>"
            continue
        key, value = line.split("=", 1)
        out[key.lstrip("+~")] = value
    return out


@dataclass
class ReportRun:
    """One finished run: its files (``run``), its overrides and its place in the input order."""

    run: Run
    overrides: dict[str, str]
    order: int = 0
    choices: dict[str, str] = field(default_factory=dict)  # Hydra's config-group choices, when recorded

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def seed(self) -> int | str | None:
        """The run's seed: its override, else its config's (an int where it reads as one)."""
        seed = self.overrides.get("seed", (self.run.config or {}).get("seed"))
        try:
            return int(seed)
        except (TypeError, ValueError):
            return seed

    def choice(self, name: str) -> str | None:
        """A config-group choice (``experiment``, ``reward``): the override, else what Hydra recorded."""
        return self.overrides.get(name, self.choices.get(name))

    def value(self, key: str) -> float:
        """A metric of ``metrics.json`` as a float; NaN when missing or null."""
        v = self.run.metrics.get(key)
        return float(v) if v is not None else math.nan


def read_run(path: Path, order: int = 0) -> ReportRun:
    run = load_run(path)
    hyd = run.path / ".hydra"
    overrides = {}
    if (hyd / "overrides.yaml").exists():
        lines = yaml.safe_load((hyd / "overrides.yaml").read_text(encoding="utf-8")) or []
        if not isinstance(lines, list):
            raise ValueError(f"{hyd / 'overrides.yaml'}: expected a list of overrides, got {type(lines).__name__}")
        overrides = parse_overrides(lines)
    choices = {}
    if (hyd / "hydra.yaml").exists():
        h = yaml.safe_load((hyd / "hydra.yaml").read_text(encoding="utf-8")) or {}
        choices = {k: v for k, v in ((h.get("hydra") or {}).get("runtime") or {}).get("choices", {}).items() if v}
    return ReportRun(run=run, overrides=overrides, order=order, choices=choices)


def find_runs(paths: Iterable[str | Path]) -> list[ReportRun]:
    """Every finished run (a dir with ``metrics.json``) at or below each path, in the order of ``paths``
    and then of their paths. A path with no finished run under it is an error that names it."""
    runs, seen = [], set()
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such run or sweep directory")
        found = [p / "metrics.json"] if (p / "metrics.json").exists() else sorted(p.rglob("metrics.json"))
        if not found:
            raise FileNotFoundError(f"{p}: no finished run (no metrics.json) here or below")
        for m in found:
            if m.parent.resolve() not in seen:
                seen.add(m.parent.resolve())
                runs.append(read_run(m.parent, order=len(runs)))
    return runs


@dataclass
class Group:
    """Runs that differ only in the folded overrides (seeds): one row of a report."""

    key: dict[str, str | None]  # the overrides that differ between groups (None: not set in these runs)
    runs: list[ReportRun]
    label: str = ""

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]

    def values(self, fn: Callable[[ReportRun], float] | str) -> list[float]:
        """One value per run: a metric key of ``metrics.json`` or a function of the run."""
        return [r.value(fn) if isinstance(fn, str) else float(fn(r)) for r in self.runs]

    def stat(self, fn: Callable[[ReportRun], float] | str) -> tuple[float, float]:
        """(mean, std) over the runs of :meth:`values` (:func:`mean_std`)."""
        return mean_std(self.values(fn))


def mean_std(xs: Iterable[float]) -> tuple[float, float]:
    """Mean and sample std (n - 1) of the finite values; std is NaN for one value, both NaN for none.
    ``statistics`` rather than numpy: its mean is correctly rounded, so tables do not move in the
    last digit when the summation order does."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else math.nan)


def differing_keys(runs: list[ReportRun], fold: Iterable[str] = FOLD) -> list[str]:
    """Override keys whose value is not the same in every run (a key some runs lack counts), in order
    of first appearance; the folded keys left out."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    return [k for k in keys if k not in fold and len({r.overrides.get(k) for r in runs}) > 1]


def shared_overrides(runs: list[ReportRun], fold: Iterable[str] = FOLD) -> dict[str, str]:
    """The overrides every run has with the same value (what the report's rows have in common)."""
    if not runs:
        return {}
    first = runs[0].overrides
    return {k: v for k, v in first.items() if k not in fold and all(r.overrides.get(k) == v for r in runs)}


def _short(values: list[str | None]) -> dict[str, str]:
    """Display names of one key's values: paths shortened to what tells them apart."""
    vals = [v for v in dict.fromkeys(values) if v is not None]
    if not vals or not all(("/" in v) for v in vals):
        return {v: v for v in vals}
    if len(vals) == 1:
        return {vals[0]: Path(vals[0]).name or vals[0]}
    try:
        common = os.path.commonpath(vals)
    except ValueError:  # absolute and relative paths mixed
        return {v: v for v in vals}
    return {v: (os.path.relpath(v, common) if common else v) for v in vals}


def group_runs(runs: list[ReportRun], fold: Iterable[str] = FOLD) -> list[Group]:
    """Runs grouped by their differing overrides (:func:`differing_keys`), in order of each group's
    first run. Each group's label is ``key=value ...`` with paths shortened; one group is "all runs"."""
    fold = tuple(fold)
    keys = differing_keys(runs, fold)
    groups: dict[tuple, Group] = {}
    for r in runs:
        key = tuple(r.overrides.get(k) for k in keys)
        if key not in groups:
            groups[key] = Group(key=dict(zip(keys, key)), runs=[])
        groups[key].runs.append(r)
    short = {k: _short([g.key[k] for g in groups.values()]) for k in keys}
    for g in groups.values():
        # a config group the runs did not override is shown with the option Hydra chose (stage=sft)
        chosen = g.runs[0].choices
        parts = [
            f"{k}={short[k][v]}" if v is not None else f"{k}={chosen[k]}"
            for k, v in g.key.items()
            if v is not None or k in chosen
        ]
        g.label = " ".join(parts) or ("all runs" if len(groups) == 1 else "(defaults)")
    return list(groups.values())


def select_group(groups: list[Group], spec: str | int | None) -> int:
    """The index of the group ``spec`` names: an index, a label, or ``key=value`` overrides (or config-group
    choices) it has (``experiment=umed_sft``, ``stage=sft``); None: the first group. An error lists the
    labels when none or several fit."""
    if spec is None:
        return 0
    if isinstance(spec, int) or str(spec).lstrip("-").isdigit():
        i = int(spec)
        if not -len(groups) <= i < len(groups):
            raise ValueError(f"baseline row {i}: there are {len(groups)} rows")
        return i % len(groups)
    labels = [g.label for g in groups]
    if spec in labels:
        return labels.index(spec)
    want = parse_overrides(str(spec).split())
    # an override, or the option Hydra chose for a config group the run did not override (stage=sft)
    hits = [i for i, g in enumerate(groups) if all(g.runs[0].choice(k) == v for k, v in want.items())]
    if len(hits) != 1:
        raise ValueError(
            f"baseline {spec!r} fits {len(hits)} rows; name one of: "
            + "; ".join(f"{i}: {lb}" for i, lb in enumerate(labels))
        )
    return hits[0]
