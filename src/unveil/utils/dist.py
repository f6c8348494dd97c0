"""Collectives on plain Python objects, a no-op without a process group."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank; ``[obj]`` outside distributed runs.

    Every rank must call it (a collective). Objects are pickled, so keep them small and on the CPU."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
