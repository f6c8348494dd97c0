"""Collectives on plain Python objects and tensors, no-ops without a process group."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank; ``[obj]`` outside distributed runs.

    Every rank must call it (a collective). Objects are pickled, so keep them small and on the CPU."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def world_size() -> int:
    """The number of processes of the default process group; 1 outside distributed runs."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default process group; 0 outside distributed runs."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every rank (a new tensor; every rank must call it); ``t`` outside distributed runs."""
    if world_size() <= 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
