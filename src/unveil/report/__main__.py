"""``python -m unveil.report <sweep dir | run dirs...> [--out DIR] [--baseline ROW] [--metrics ...]``

Writes ``report.md``, ``report.csv`` and ``*.png`` into ``--out`` (default ``<the one dir given>/report``,
or ``report/`` in the deepest folder holding every run) and prints where.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from unveil.report.write import build_report, common_root, write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m unveil.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, help="a sweep dir, run dirs, or folders holding runs")
    ap.add_argument("--out", type=Path, default=None, help="where report.md, report.csv and the figures go")
    ap.add_argument(
        "--baseline",
        default=None,
        help="the row the others are compared with: its index, its label, or overrides it has "
        "('experiment=umed_sft'); default the first row (the runs of the first path come first)",
    )
    ap.add_argument("--metrics", nargs="+", default=None, help="table metrics (default: every one the runs report)")
    ap.add_argument("--metric", default=None, help="the metric of the breakdowns and the runs table (default iou)")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (0: no intervals)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws")
    ap.add_argument("--fold", nargs="*", default=["seed"], help="overrides folded into mean ± std (default: seed)")
    ap.add_argument("--title", default=None)
    ap.add_argument("--no-figures", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    try:
        report = build_report(
            a.paths,
            baseline=a.baseline,
            metrics=a.metrics,
            primary=a.metric,
            n_boot=a.bootstrap,
            seed=a.seed,
            fold=a.fold,
        )
    except (FileNotFoundError, ValueError) as e:  # no runs there, an unknown baseline: the message says which
        raise SystemExit(f"unveil.report: {e}") from e
    out = a.out or ((a.paths[0] if len(a.paths) == 1 else common_root(report.runs)) / "report")
    command = shlex.join(["python", "-m", "unveil.report", *(sys.argv[1:] if argv is None else argv)])
    paths = write_report(report, out, command=command, title=a.title, figures_on=not a.no_figures)
    print(f"{len(report.runs)} runs in {len(report.groups)} rows; wrote " + ", ".join(str(p) for p in paths.values()))
    return paths


if __name__ == "__main__":
    main()
