"""Small helpers the reward heads share (not a head)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch

log = logging.getLogger("unveil.rewards")
_warned: set[str] = set()


def warn_once(key: str, msg: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


def task_set(tasks: Iterable[str] | str | None) -> frozenset[str] | None:
    """``None`` = every task; a string or a list names the tasks a head applies to."""
    if tasks is None:
        return None
    if isinstance(tasks, str):
        return frozenset([tasks])
    return frozenset(str(t) for t in tasks)


def applies(tasks: frozenset[str] | None, task: str) -> bool:
    return tasks is None or task in tasks


def finite_or_nan(x) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError, OverflowError):
        return float("nan")
    return x if math.isfinite(x) else float("nan")


def per_sample(name: str, fn: Callable[[int], float], n: int) -> torch.Tensor:
    """Run ``fn(i)`` for each completion; an unexpected error gives NaN (logged once), never raises."""
    out = torch.full((n,), float("nan"), dtype=torch.float32)
    for i in range(n):
        try:
            out[i] = finite_or_nan(fn(i))
        except Exception as e:  # noqa: BLE001  (a head must survive any model text)
            warn_once(
                f"{name}:{type(e).__name__}",
                "reward head %s failed on a completion (%s: %s); scored NaN",
                name,
                type(e).__name__,
                e,
            )
    return out


def frame_for_sample(backbone, sample):
    """The frame a completion about ``sample`` is parsed in (unveil.data.frames); None = identity."""
    if backbone is None or not getattr(sample, "images", None):
        return None
    from unveil.data.frames import answer_frame

    return answer_frame(backbone, sample)


def box_format_of(backbone, fallback: str = "int100"):
    from unveil.data.boxes import get_box_format

    fmt = getattr(backbone, "box_format", None) if backbone is not None else None
    return fmt if fmt is not None else get_box_format(fallback)
