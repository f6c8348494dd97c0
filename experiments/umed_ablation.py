"""UMed-LVLM reward ablation (paper Table 6) on the embedded default: SFT once, then RL variants.

1. SFT:  ``python -m unveil.train experiment=umed_sft hydra.run.dir=<out>/sft``
2. RL, one Hydra multirun per algorithm from that model (a cluster launcher can be passed with ``--launcher``):
   ``python -m unveil.train -m experiment=umed_ppo reward=relevance_only,umed_no_vision,umed_no_loc,umed
   seed=0,1,2 model.init_from=<out>/sft hydra.sweep.dir=<out>/rl/umed_ppo [hydra/launcher=...]``, the same with
   ``experiment=umed_grpo``
   (``reward=relevance_only`` is the paper's "plain PPO"; ``umed`` the full method; the other two
   drop one reward.)
3. Collect every run's ``metrics.json`` into ``experiments/results/umed_ablation.{md,csv}``: rows =
   variants, a column per modality and the average over modalities (per seed, then mean +- std over
   seeds), for matched IoU, acc@0.5 and finding accuracy. The exact commands head the Markdown; its
   "Reading" section is left for a person to write (text already there is kept on re-collection).

    python experiments/umed_ablation.py [--seeds 0 1 2] [--launcher submitit_slurm] [--threads N] [-- extra overrides]
    python experiments/umed_ablation.py --quick          # smoke test: debug-size data, 1 seed, a few steps
    python experiments/umed_ablation.py --collect-only --out <dir>
"""

from __future__ import annotations

import argparse
import math
import shlex
import subprocess
import sys
from pathlib import Path

from unveil.report import (
    Group,
    ReportRun,
    breakdown_values,
    build_report,
    column,
    existing_reading,
    find_runs,
    fmt,
    group_runs,
    md_table,
    per_value,
    read_run,
    reading_lines,
    write_csv,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling helpers below, however this file is loaded
from ablation_cli import add_common_args, add_tail_args, setup  # noqa: E402

ALGOS = {"umed_ppo": "PPO", "umed_grpo": "GRPO"}
REWARDS = {  # reward preset -> row label (paper Table 6 wording)
    "relevance_only": "plain (relevance only)",
    "umed_no_vision": "w/o vision relevance",
    "umed_no_loc": "w/o localisation",
    "umed": "full (relevance + localisation + vision relevance)",
}
METRICS = {"iou": "matched IoU", "acc50": "acc@0.5", "finding_acc": "finding accuracy"}


def run(cmd: list[str], env: dict) -> None:
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def commands(a, out: Path) -> tuple[list[str], list[list[str]]]:
    py = [sys.executable, "-m", "unveil.train"]
    quick = ["debug=fast"] if a.quick else []
    sft = py + ["experiment=umed_sft", f"hydra.run.dir={out / 'sft'}", *quick]
    if a.quick:
        sft.append(f"trainer.max_steps={a.sft_steps or 3}")
    elif a.sft_steps:
        sft.append(f"trainer.max_steps={a.sft_steps}")
    rls = []
    for exp in a.algos:  # one multirun per algorithm: an experiment file cannot itself be a swept value
        rl = py + [
            "-m",
            f"experiment={exp}",
            f"reward={','.join(a.rewards)}",
            f"seed={','.join(map(str, a.seeds))}",
            f"model.init_from={a.sft_dir or out / 'sft'}",
            f"hydra.sweep.dir={out / 'rl' / exp}",
            "hydra.sweep.subdir=${hydra:runtime.choices.reward}/seed${seed}",
            *quick,
        ]
        if a.quick:
            rl += [f"trainer.max_steps={a.rl_steps or 2}", "stage.max_new_tokens=24", "stage.log_completions_every=1"]
        elif a.rl_steps:
            rl.append(f"trainer.max_steps={a.rl_steps}")
        if a.launcher:
            rl.append(f"hydra/launcher={a.launcher}")
        rls.append(rl + list(a.overrides))
    return sft, rls


# --- collection (through unveil.report: runs grouped by their overrides, seeds folded) -------------
def rl_groups(rl_dir: Path) -> dict[tuple[str, str], Group]:
    """The finished RL runs under ``rl_dir`` by (experiment, reward preset)."""
    out: dict[tuple[str, str], Group] = {}
    for g in group_runs(find_runs([rl_dir])):
        key = (g.runs[0].choice("experiment"), g.runs[0].choice("reward"))
        if key in out:
            raise SystemExit(
                f"runs of experiment={key[0]} reward={key[1]} under {rl_dir} differ in other overrides "
                f"({out[key].label} / {g.label}): collect them separately"
            )
        out[key] = g
    return out


def modalities(runs: list[ReportRun]) -> list[str]:
    return sorted({v for r in runs for m in METRICS for v in breakdown_values(r, "modality", m)})


def table_rows(sft: ReportRun | None, groups: dict[tuple[str, str], Group], mods: list[str]) -> list[dict]:
    """SFT, then PPO and GRPO with each reward preset: per modality and their average (per run, then
    mean ± std over the row's runs)."""
    cols = mods + ["average"]
    rows = []
    if sft is not None:
        row = {"algo": "SFT", "variant": "SFT (no RL)", "reward": "", "n_seeds": 1}
        for metric in METRICS:
            for c, v in per_value(sft, "modality", metric, mods).items():
                row[f"{metric}/{c}/mean"], row[f"{metric}/{c}/std"] = v, math.nan
        rows.append(row)
    for exp, algo in ALGOS.items():
        for reward, label in REWARDS.items():
            g = groups.get((exp, reward))
            if g is None:
                continue
            row = {"algo": algo, "variant": label, "reward": reward, "n_seeds": len(set(g.seeds))}
            for metric in METRICS:
                for c in cols:
                    row[f"{metric}/{c}/mean"], row[f"{metric}/{c}/std"] = g.stat(column("modality", metric, mods, c))
            rows.append(row)
    return rows


def write_tables(rows: list[dict], mods: list[str], cmds: list[str], md: Path, csv_path: Path, note: str) -> None:
    cols = mods + ["average"]
    fields = ["algo", "variant", "reward", "n_seeds"] + [
        f"{m}/{c}/{s}" for m in METRICS for c in cols for s in ("mean", "std")
    ]
    write_csv(rows, fields, csv_path)

    reading = existing_reading(md)
    lines = ["# UMed-LVLM reward ablation (paper Table 6 shape)", "", "Produced by:", "", "```"]
    lines += cmds + [
        "```",
        "",
        note,
        "",
        "Rows: SFT, then each RL algorithm with the reward presets of `conf/reward/`. Columns: one per "
        "modality of the test split and their average (the average is taken per seed, then mean ± std "
        "over seeds; the SFT row is one run). Metrics from each run's `metrics.json` "
        "(`test/modality/<modality>/<metric>`).",
        "",
    ]
    for metric, title in METRICS.items():
        cells = [
            [r["algo"], r["variant"], r["n_seeds"]]
            + [fmt(r[f"{metric}/{c}/mean"], r[f"{metric}/{c}/std"]) for c in cols]
            for r in rows
        ]
        lines += [f"## {title} (`{metric}`)", ""] + md_table(["algorithm", "variant", "seeds", *cols], cells) + [""]
    lines += reading_lines(reading, "\n".join(lines))
    md.write_text("\n".join(lines))
    print(f"wrote {md} and {csv_path}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="root of the SFT run and the RL sweep (default logs/umed_ablation[_quick])",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS), help="RL experiments to run")
    ap.add_argument("--rewards", nargs="+", default=list(REWARDS), choices=list(REWARDS), help="reward presets to run")
    ap.add_argument(
        "--launcher", default=None, help="Hydra launcher for the RL sweep, e.g. submitit_slurm (hydra/launcher=...)"
    )
    ap.add_argument("--sft-dir", type=Path, default=None, help="reuse this SFT run instead of training one")
    ap.add_argument("--sft-steps", type=int, default=None)
    ap.add_argument("--rl-steps", type=int, default=None)
    add_common_args(ap)
    add_tail_args(ap, "RL runs")
    a = ap.parse_args()
    out, env = setup(a, "umed_ablation")
    sft_cmd, rl_cmds = commands(a, out)
    shown = [
        shlex.join(["python", "experiments/umed_ablation.py", *(x for x in sys.argv[1:] if x != "--collect-only")]),
        "# which runs:",
    ]
    shown += [shlex.join(["python", *c[1:]]) for c in (rl_cmds if a.sft_dir else [sft_cmd, *rl_cmds])]
    shown = [line.replace(f"{ROOT}/", "") for line in shown]  # committed results name repo-relative paths

    if not a.collect_only:
        if not a.sft_dir:
            run(sft_cmd, env)
        for cmd in rl_cmds:
            run(cmd, env)

    sft_dir = a.sft_dir or out / "sft"
    sft = read_run(sft_dir) if (sft_dir / "metrics.json").exists() else None
    if not (out / "rl").exists() or not list((out / "rl").rglob("metrics.json")):
        raise SystemExit(f"no finished RL runs under {out / 'rl'}")
    groups = rl_groups(out / "rl")
    runs = [r for g in groups.values() for r in g.runs]
    mods = modalities(runs + ([sft] if sft else []))
    rows = table_rows(sft, groups, mods)
    name = "umed_ablation_quick" if a.quick else "umed_ablation"
    note = (
        "Smoke-test size (`--quick`: debug-size data, one seed, a few steps): the numbers only show that the "
        "pipeline runs end to end."
        if a.quick
        else f"{len(runs)} RL runs, seeds {a.seeds}."
    )
    write_tables(rows, mods, shown, a.results / f"{name}.md", a.results / f"{name}.csv", note)
    # every row against SFT with paired-bootstrap intervals over test studies, and the figures
    report = build_report(([sft] if sft else []) + runs, baseline=0)
    paths = write_report(report, out / "report", command=shown[0], title="UMed-LVLM reward ablation")
    print(f"wrote {paths['md']} (differences to SFT with 95% intervals, figures)")


if __name__ == "__main__":
    main()
