"""MMedPO ablation on the embedded synthetic data: one SFT run, preference data from the builders, DPO variants.

1. SFT (one run): ``python -m unveil.train trainer.max_steps=<--sft-steps> eval.split=val hydra.run.dir=<out>/sft``,
   then ``python -m unveil.eval ckpt_path=<out>/sft split=test max_samples=<--test-records>`` for its table row.
   The default SFT (1,300 steps) no longer invents boxes on normal studies (invented_box_rate 0 on
   test), which leaves DPO nothing to remove; the ablation therefore starts from a *shorter* SFT
   that still does (``--sft-steps``, default below). The step count was chosen on the val split
   (SFT runs with ``eval.split=val``), never by looking at test; see experiments/results/mmedpo_ablation.md.
2. Preference data, from the command line, on the same synthetic data (``python -m unveil.curate``):
   ``builder=mmedpo model.init_from=<out>/sft`` (text pairs sampled from the SFT model, the judge's
   most wrong sample rejected, a rule writing one when no sample is wrong enough; visual pairs =
   the reference answer on the image with its lesion noised; relevance weights), and three
   variants of it: ``builder.visual=null`` (text pairs only), ``builder.text=null`` (visual pairs
   only) and ``builder.visual.mode=global`` (the whole image noised). Same seed, so the text pairs
   of the three sets that have them are the same pairs.
3. DPO, one Hydra multirun over ``seed`` per table row (``--launcher`` passes ``hydra/launcher=...``
   for a cluster): ``python -m unveil.train -m experiment=mmedpo_dpo data.root=<pref set>
   stage.weight_norm=<none|raw|mmedpo> model.init_from=<out>/sft seed=0,1,2 ...``.
4. Collect each run's ``metrics.json`` (test split) into ``experiments/results/mmedpo_ablation.{md,csv}``:
   SFT, then one row per variant, mean +- std over seeds, per-seed values in the CSV. The exact
   commands head the Markdown; its "Reading" section is kept on re-collection.

    python experiments/mmedpo_ablation.py [--seeds 0 1 2] [--launcher submitit_slurm] [--threads N] \
        [-- extra DPO overrides]
    python experiments/mmedpo_ablation.py --quick          # smoke test: debug-size data, 1 seed, a few steps
    python experiments/mmedpo_ablation.py --collect-only --out <dir>
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

from unveil.report import (
    Group,
    ReportRun,
    build_report,
    existing_reading,
    find_runs,
    fmt,
    group_runs,
    md_table,
    read_run,
    reading_lines,
    write_csv,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling helpers below, however this file is loaded
from ablation_cli import add_common_args, add_tail_args, setup  # noqa: E402

# preference set -> (curate overrides, description)
PREF_SETS = {
    "mmedpo": (["builder=mmedpo"], "text + visual (local noise) pairs, relevance-weighted"),
    "text": (["builder=mmedpo", "builder.visual=null"], "text pairs only"),
    "visual": (["builder=mmedpo", "builder.text=null"], "visual pairs only (local noise)"),
    "global": (["builder=mmedpo", "builder.visual.mode=global"], "text + visual pairs, global noise"),
}
# table row -> (label, preference set, stage.weight_norm)
VARIANTS = {
    "dpo": ("DPO (unweighted), text + visual", "mmedpo", "none"),
    "wdpo_raw": ("weighted DPO, raw weights (MMedPO code), text + visual", "mmedpo", "raw"),
    "wdpo_mmedpo": ("weighted DPO, mmedpo normaliser (paper), text + visual, local noise", "mmedpo", "mmedpo"),
    "text_only": ("weighted DPO (mmedpo), text pairs only", "text", "mmedpo"),
    "visual_only": ("weighted DPO (mmedpo), visual pairs only", "visual", "mmedpo"),
    "global_noise": ("weighted DPO (mmedpo), text + visual, global noise", "global", "mmedpo"),
}
METRICS = {
    "invented_box_rate": "invented boxes (normal studies)",
    "fpr_normal": "FPR normal",
    "closed_acc": "closed VQA acc",
    "iou": "matched IoU",
    "presence_acc": "presence acc",
    "acc50": "acc@0.5",
    "finding_acc": "finding acc",
}

# Defaults of the full run (sized for about 45 minutes on a 2-core CPU). The SFT length was
# chosen on the val split: see the module docstring and the results' note.
SFT_WARMUP = 100
SFT_STEPS = 300
DPO_STEPS = 100
DPO_LR = 2e-4
TRAIN_RECORDS = 1200  # curated input records of the training split (-> text + visual pairs)
VAL_RECORDS = 64
TEST_RECORDS = 1200  # first records of the test split, the same for SFT and every DPO run


def run(cmd: list[str], env: dict) -> float:
    print("+", shlex.join(cmd), flush=True)
    t = time.time()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return time.time() - t


def commands(a, out: Path) -> dict:
    """The SFT, curate and DPO command lines (lists of argv), keyed by stage."""
    py = [sys.executable, "-m"]
    test_cap = a.test_records
    sft_dir = a.sft_dir or out / "sft"
    if a.quick:
        data_small = ["data.synthetic.n_patients=24"]
        sft = py + [
            "unveil.train",
            "debug=fast",
            f"trainer.max_steps={a.sft_steps or 3}",
            f"hydra.run.dir={out / 'sft'}",
        ]
        caps = "max_samples={train:16,val:12}"  # enough val studies with a lesion for visual pairs
        dpo_size = [
            f"trainer.max_steps={a.dpo_steps or 2}",
            f"trainer.val_check_interval={a.dpo_steps or 2}",
            "data.batch_size=2",
            "data.eval_batch_size=8",
            "data.max_samples={val:4,test:12}",
            "eval.max_new_tokens=24",
            "trainer.log_every_n_steps=1",
            "trainer.enable_model_summary=false",
        ]
    else:
        data_small = []
        steps = a.sft_steps or SFT_STEPS
        # a short SFT that still invents boxes, on the plain patch grid the table was made with
        sft = py + [
            "unveil.train",
            f"model.vision_pretrain.steps={a.sft_warmup}",
            "model.spec.slot_tokens=0",
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}",
            "eval.split=val",
            f"hydra.run.dir={out / 'sft'}",
        ]
        caps = f"max_samples={{train:{a.train_records},val:{VAL_RECORDS}}}"
        k = a.dpo_steps or DPO_STEPS
        # localize pairs drawn 3x as often as closed-question pairs, as the SFT default samples them
        dpo_size = [
            f"trainer.max_steps={k}",
            f"trainer.val_check_interval={k}",
            "data.batch_size=8",
            "data.task_weights={localize:3.0}",
            "data.eval_batch_size=64",
            f"data.max_samples={{val:{VAL_RECORDS},test:{test_cap}}}",
        ]
    # the SFT row: the same test records as every DPO run
    sft_eval = py + [
        "unveil.eval",
        f"ckpt_path={sft_dir}",
        "split=test",
        f"max_samples={12 if a.quick else test_cap}",
        *(["max_new_tokens=24", "batch_size=8"] if a.quick else ["batch_size=64"]),
        f"hydra.run.dir={out / 'sft_test'}",
    ]
    curate = {}
    for name, (ovr, _) in PREF_SETS.items():
        curate[name] = py + [
            "unveil.curate",
            *ovr,
            f"model.init_from={sft_dir}",
            f"out_dir={out / 'pref' / name}",
            "seed=0",
            caps,
            "progress=false",
            "num_threads=1",
            f"hydra.run.dir={out / 'pref' / name / 'hydra'}",
            *data_small,
        ]
    dpo = {}
    for row, (_, pref, norm) in VARIANTS.items():
        cmd = py + [
            "unveil.train",
            "-m",
            "experiment=mmedpo_dpo",
            f"data.root={out / 'pref' / pref}",
            f"stage.weight_norm={norm}",
            f"stage.optim.lr={a.lr}",
            f"seed={','.join(map(str, a.seeds))}",
            f"model.init_from={sft_dir}",
            "data.num_workers=0",
            *dpo_size,
            f"hydra.sweep.dir={out / 'dpo' / row}",
            "hydra.sweep.subdir=seed${seed}",
        ]
        if a.launcher:
            cmd.append(f"hydra/launcher={a.launcher}")
        dpo[row] = cmd + list(a.overrides)
    return {"sft": sft, "sft_eval": sft_eval, "curate": curate, "dpo": dpo}


# --- collection (through unveil.report: runs grouped by their overrides, seeds folded) -------------
def variant_of(g: Group) -> str:
    """The table row of a group of DPO runs: the VARIANTS entry with its preference set (the folder
    name of ``data.root``) and ``stage.weight_norm``, read from the resolved config; else its label."""
    cfg = g.runs[0].run.config or {}
    key = (Path(str((cfg.get("data") or {}).get("root", ""))).name, (cfg.get("stage") or {}).get("weight_norm"))
    return next((v for v, (_, pref, norm) in VARIANTS.items() if (pref, norm) == key), g.label)


def dpo_groups(dpo_dir: Path) -> dict[str, Group]:
    """Every finished DPO run under ``dpo_dir``, by variant (VARIANTS order, then any others)."""
    if not Path(dpo_dir).exists() or not list(Path(dpo_dir).rglob("metrics.json")):
        raise SystemExit(f"no finished DPO runs under {dpo_dir}")
    groups = {}
    for g in group_runs(find_runs([dpo_dir])):
        v = variant_of(g)
        if v in groups:
            raise SystemExit(f"DPO runs of variant {v} differ in other overrides ({groups[v].label} / {g.label})")
        groups[v] = g
    return {v: groups[v] for v in [*VARIANTS, *groups] if v in groups}


def table_rows(sft: ReportRun | None, groups: dict[str, Group]) -> list[dict]:
    rows = []
    if sft is not None:
        row = {
            "variant": "sft",
            "label": "SFT (start of every DPO run)",
            "pref": "",
            "weight_norm": "",
            "n_seeds": 1,
            "seeds": "",
        }
        for k in METRICS:
            row[f"{k}/mean"], row[f"{k}/std"] = sft.value(f"test/{k}"), math.nan
        rows.append(row)
    for v, g in groups.items():
        runs = sorted(g.runs, key=lambda r: (r.seed is None, r.seed))
        label, pref, norm = VARIANTS.get(
            v, (v, "", (runs[0].run.config or {}).get("stage", {}).get("weight_norm", ""))
        )
        row = {
            "variant": v,
            "label": label,
            "pref": pref,
            "weight_norm": norm,
            "n_seeds": len(runs),
            "seeds": " ".join(str(r.seed) for r in runs),
        }
        for k in METRICS:
            row[f"{k}/mean"], row[f"{k}/std"] = g.stat(f"test/{k}")
            for r in runs:
                row[f"{k}/seed{r.seed}"] = r.value(f"test/{k}")
        rows.append(row)
    return rows


def pref_summaries(pref_dir: Path) -> list[str]:
    """One line per preference set from its curate summary.json (pairs written, mean raw weight, sources)."""
    rows = []
    for name, (_, desc) in PREF_SETS.items():
        f = Path(pref_dir) / name / "summary.json"
        if not f.exists():
            continue
        sp = json.loads(f.read_text())["splits"].get("train", {})
        src = ", ".join(
            f"{k.split('/', 1)[1]} {v}"
            for k, v in sorted(sp.items())
            if k.startswith(
                ("hallucination/source", "hallucination/rule/", "lesion_noise/", "hallucination/model_fallback")
            )
        )
        rows.append(
            [
                f"`{name}`",
                desc,
                sp.get("read", 0),
                sp.get("written", 0),
                f"{sp.get('weight_mean', float('nan')):.3f}",
                src,
            ]
        )
    header = ["set", "pairs", "train records read", "train pairs", "mean raw weight", "sources"]
    return md_table(header, rows) if rows else []


def write_tables(
    rows: list[dict], cmds: list[str], md: Path, csv_path: Path, note: str, pref_lines: list[str] = ()
) -> None:
    seeds = sorted({k.split("/seed", 1)[1] for r in rows for k in r if "/seed" in k}, key=lambda s: (len(s), s))
    fields = ["variant", "label", "pref", "weight_norm", "n_seeds", "seeds"] + [
        f"{k}/{s}" for k in METRICS for s in ("mean", "std", *(f"seed{x}" for x in seeds))
    ]
    write_csv(rows, fields, csv_path)

    reading = existing_reading(md)
    lines = ["# MMedPO ablation (synthetic data, tiny LLaVA)", "", "Produced by:", "", "```"]
    lines += cmds + ["```", "", note, ""]
    if pref_lines:
        lines += ["## Preference data (train split, from `summary.json` of each curate run)", "", *pref_lines, ""]
    main = [[r["label"], r["n_seeds"]] + [fmt(r[f"{k}/mean"], r[f"{k}/std"]) for k in METRICS] for r in rows]
    lines += ["## Test split, mean ± std over seeds (the SFT row is one run)", ""]
    lines += md_table(["variant", "seeds", *METRICS.values()], main)
    per_seed = [
        [r["label"]]
        + [
            " / ".join(fmt(r.get(f"{k}/seed{s}", math.nan)) for k in ("invented_box_rate", "closed_acc", "iou"))
            for s in seeds
        ]
        for r in rows
        if r["variant"] != "sft"
    ]
    lines += ["", "## Per seed: invented-box rate / closed VQA acc / matched IoU", ""]
    lines += md_table(["variant", *(f"seed {s}" for s in seeds)], per_seed)
    lines += [""] + reading_lines(reading, "\n".join(lines))
    md.write_text("\n".join(lines))
    print(f"wrote {md} and {csv_path}")


def collect(out: Path, sft_test: Path, cmds: list[str], md: Path, csv_path: Path, note: str) -> list[dict]:
    """Rows of the SFT evaluation (``sft_test/metrics.json``) and of every DPO run under ``<out>/dpo``.

    Writes md + csv, and ``<out>/report/``: every row against SFT with paired-bootstrap intervals
    over test studies, and the figures (:mod:`unveil.report`).
    """
    sft = read_run(sft_test) if (sft_test / "metrics.json").exists() else None
    groups = dpo_groups(out / "dpo")
    rows = table_rows(sft, groups)
    write_tables(rows, cmds, md, csv_path, note, pref_summaries(out / "pref"))
    runs = [r for g in groups.values() for r in g.runs]
    report = build_report(([sft] if sft else []) + runs, baseline=0)
    paths = write_report(report, out / "report", command=cmds[0] if cmds else None, title="MMedPO ablation")
    print(f"wrote {paths['md']} (differences to SFT with 95% intervals, figures)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="root of the SFT run, preference sets and DPO sweeps (default logs/mmedpo_ablation[_quick])",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--launcher", default=None, help="Hydra launcher for the DPO sweeps, e.g. submitit_slurm (hydra/launcher=...)"
    )
    ap.add_argument("--sft-dir", type=Path, default=None, help="reuse this SFT run instead of training one")
    ap.add_argument(
        "--sft-steps", type=int, default=None, help=f"SFT steps (default {SFT_STEPS}; 400 vision warm-up steps first)"
    )
    ap.add_argument(
        "--sft-warmup", type=int, default=SFT_WARMUP, help=f"vision warm-up steps before SFT (default {SFT_WARMUP})"
    )
    ap.add_argument("--dpo-steps", type=int, default=None, help=f"DPO steps per run (default {DPO_STEPS})")
    ap.add_argument("--lr", type=float, default=DPO_LR, help="DPO learning rate (LoRA)")
    ap.add_argument("--train-records", type=int, default=TRAIN_RECORDS, help="training records the builders curate")
    ap.add_argument(
        "--test-records", type=int, default=TEST_RECORDS, help="first N test records evaluated (SFT and DPO)"
    )
    add_common_args(ap)
    ap.add_argument("--skip-existing", action="store_true", help="skip stages whose output already exists (resume)")
    add_tail_args(ap, "DPO runs")
    a = ap.parse_args()
    out, env = setup(a, "mmedpo_ablation")
    cmds = commands(a, out)
    shown = [
        shlex.join(
            [
                "python",
                "experiments/mmedpo_ablation.py",
                *(x for x in sys.argv[1:] if x not in ("--collect-only", "--skip-existing")),
            ]
        ),
        "# which runs:",
    ]
    todo = (
        ([] if a.sft_dir else [("sft", cmds["sft"])])
        + [("sft_eval", cmds["sft_eval"])]
        + [(f"curate/{k}", c) for k, c in cmds["curate"].items()]
        + [(f"dpo/{k}", c) for k, c in cmds["dpo"].items()]
    )
    shown += [shlex.join(["python", *c[1:]]).replace(str(out), "$OUT") for _, c in todo]

    timing_file = out / "timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    if not a.collect_only:
        out.mkdir(parents=True, exist_ok=True)
        for name, cmd in todo:
            done = {"sft": out / "sft" / "metrics.json", "sft_eval": out / "sft_test" / "metrics.json"}.get(name) or (
                out / "pref" / name.split("/")[1] / "summary.json" if name.startswith("curate/") else None
            )
            if a.skip_existing and done is not None and done.exists():
                continue
            timing[name] = round(run(cmd, env), 1)
            timing_file.write_text(json.dumps(timing, indent=2) + "\n")

    name = "mmedpo_ablation_quick" if a.quick else "mmedpo_ablation"
    total = sum(timing.values())
    sft_steps = a.sft_steps or (3 if a.quick else SFT_STEPS)
    note = (
        "Smoke-test size (`--quick`: debug-size data, one seed, a few steps): the numbers only show that the "
        "pipeline runs end to end."
        if a.quick
        else f"$OUT = `{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}`. SFT: the default recipe cut to "
        f"{a.sft_warmup} vision warm-up steps (default 800), no slot tokens and {sft_steps} SFT steps "
        f"(default 1,300; cosine schedule over those steps); "
        f"the default 1,300 steps invents no boxes on normal studies. Preference data from the first "
        f"{a.train_records} training records; DPO {a.dpo_steps or DPO_STEPS} steps x 8 pairs, LoRA r16, lr {a.lr}, "
        f"beta 0.1, seeds {a.seeds}. Test metrics on the first {a.test_records} records of the synthetic test split "
        f"(the same records for every row)."
    )
    if timing:
        note += (
            " Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timing.items()) + f"; total {total / 60:.1f} min."
        )
    collect(out, out / "sft_test", shown, a.results / f"{name}.md", a.results / f"{name}.csv", note)


if __name__ == "__main__":
    main()
