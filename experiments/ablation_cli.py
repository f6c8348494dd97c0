"""Command-line pieces the ablation scripts share: the common flags and what they set up."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """--threads, --quick, --collect-only."""
    ap.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of each run")
    ap.add_argument("--quick", action="store_true", help="smoke test: debug-size data, 1 seed, a few steps")
    ap.add_argument("--collect-only", action="store_true")


def add_tail_args(ap: argparse.ArgumentParser, runs: str) -> None:
    """--results, and the trailing Hydra overrides passed to ``runs``."""
    ap.add_argument("--results", type=Path, default=ROOT / "experiments" / "results")
    ap.add_argument("overrides", nargs="*", help=f"extra Hydra overrides for the {runs} (after --)")


def setup(a: argparse.Namespace, name: str) -> tuple[Path, dict]:
    """After parsing: one seed under --quick; the output root (default logs/<name>[_quick]); the
    environment of the child runs (thread count)."""
    if a.quick:
        a.seeds = a.seeds[:1]
    out = (a.out or ROOT / "logs" / (f"{name}_quick" if a.quick else name)).resolve()
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(a.threads)
    return out, env
