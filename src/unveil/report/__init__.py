"""From finished runs to a report: ``python -m unveil.report <sweep dir | run dirs...>``.

Finds every run (a dir with ``metrics.json``) under the given paths, groups the runs by the Hydra
overrides that differ between them (``seed`` folded into mean ± std), and writes ``report.md``,
``report.csv`` and figures: a bar chart of the test metrics per row, each row's difference to a
baseline row with a paired bootstrap 95% interval over test studies (from ``predictions.jsonl``),
per-modality / per-ability breakdowns and the training curves of ``csv/metrics.csv``.

    from unveil.report import build_report, write_report
    report = build_report(["logs/umed_ablation"], baseline="experiment=umed_sft")
    write_report(report, "logs/umed_ablation/report")

The ablation scripts in ``experiments/`` build their tables from the same pieces
(:func:`find_runs`, :func:`group_runs`, :meth:`Group.stat`, :func:`fmt`, :func:`write_csv`).
"""

from unveil.report.collect import (
    Group,
    ReportRun,
    find_runs,
    group_runs,
    mean_std,
    parse_overrides,
    read_run,
    select_group,
    shared_overrides,
)
from unveil.report.stats import Delta, breakdown_values, column, paired_bootstrap, per_value, record_terms
from unveil.report.tables import existing_reading, fmt, fmt_delta, md_table, reading_lines, write_csv
from unveil.report.write import Report, build_report, common_root, write_report

__all__ = [
    "Delta",
    "Group",
    "Report",
    "ReportRun",
    "breakdown_values",
    "build_report",
    "column",
    "common_root",
    "existing_reading",
    "reading_lines",
    "find_runs",
    "fmt",
    "fmt_delta",
    "group_runs",
    "md_table",
    "mean_std",
    "paired_bootstrap",
    "parse_overrides",
    "per_value",
    "read_run",
    "record_terms",
    "select_group",
    "shared_overrides",
    "write_csv",
    "write_report",
]
