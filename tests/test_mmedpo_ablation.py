"""experiments/mmedpo_ablation.py: the command lines it runs and its collection, on hand-made metrics.json files.

(The --quick mode runs SFT, four curate passes and six DPO sweeps in separate processes: over a
minute on a CPU, so the test checks the collection instead of running it.)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import pytest
from conftest import ROOT, load_experiment


@pytest.fixture(scope="module")
def abl():
    return load_experiment("mmedpo_ablation")


def _run(dir_: Path, seed: int, norm: str, metrics: dict, pref: str = "mmedpo") -> None:
    """A DPO run dir as the script's sweeps leave it: the resolved config, the overrides, the metrics."""
    (dir_ / ".hydra").mkdir(parents=True)
    root = f"/x/pref/{pref}"
    (dir_ / ".hydra" / "config.yaml").write_text(
        f"seed: {seed}\nstage:\n  weight_norm: {norm}\ndata:\n  root: {root}\n"
    )
    overrides = ["experiment=mmedpo_dpo", f"data.root={root}", f"stage.weight_norm={norm}", f"seed={seed}"]
    (dir_ / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (dir_ / "metrics.json").write_text(json.dumps({f"test/{k}": v for k, v in metrics.items()}))


def test_collection_means_stds_and_per_seed_values(abl, tmp_path):
    out = tmp_path / "abl"
    sft = out / "sft_test"  # the SFT row: unveil.eval of the SFT run on the test records
    sft.mkdir(parents=True)
    (sft / "metrics.json").write_text(
        json.dumps({"test/invented_box_rate": 0.4, "test/closed_acc": 0.8, "test/iou": 0.3})
    )
    for seed, ibr in zip((0, 1, 2), (0.1, 0.2, 0.3)):
        _run(
            out / "dpo" / "wdpo_mmedpo" / f"seed{seed}",
            seed,
            "mmedpo",
            {"invented_box_rate": ibr, "closed_acc": 0.9, "iou": 0.25, "mcq_acc": None},
        )
    _run(out / "dpo" / "dpo" / "seed0", 0, "none", {"invented_box_rate": 0.35, "closed_acc": 0.85, "iou": 0.3})
    (out / "dpo" / "dpo" / "seed1").mkdir()  # an unfinished run (no metrics.json) is left out
    pref = out / "pref" / "mmedpo"
    pref.mkdir(parents=True)
    (pref / "summary.json").write_text(
        json.dumps(
            {
                "splits": {
                    "train": {
                        "read": 10,
                        "written": 18,
                        "weight_mean": 0.5,
                        "hallucination/source/model": 6,
                        "hallucination/source/rules": 4,
                    }
                }
            }
        )
    )

    md, csv_path = tmp_path / "r.md", tmp_path / "r.csv"
    md.write_text("# old\n\n## Reading\n\nA person's notes.\n")
    rows = abl.collect(out, sft, ["python experiments/mmedpo_ablation.py"], md, csv_path, "a note")

    by = {r["variant"]: r for r in rows}
    assert [r["variant"] for r in rows] == ["sft", "dpo", "wdpo_mmedpo"]  # SFT first, then the VARIANTS order
    assert by["sft"]["invented_box_rate/mean"] == 0.4 and math.isnan(by["sft"]["invented_box_rate/std"])
    w = by["wdpo_mmedpo"]
    assert w["n_seeds"] == 3 and w["seeds"] == "0 1 2"
    assert w["invented_box_rate/mean"] == pytest.approx(0.2)
    assert w["invented_box_rate/std"] == pytest.approx(0.1)
    assert w["invented_box_rate/seed2"] == pytest.approx(0.3)
    assert math.isnan(by["dpo"]["invented_box_rate/std"]) and by["dpo"]["n_seeds"] == 1
    assert math.isnan(w["acc50/mean"])  # a metric no run reported

    text = md.read_text()
    assert text.splitlines()[0].startswith("# MMedPO ablation")
    assert "python experiments/mmedpo_ablation.py" in text and "a note" in text
    assert "0.200 ± 0.100" in text and "| SFT (start of every DPO run) | 1 | 0.400 |" in text
    assert "0.100 / 0.900 / 0.250" in text  # the per-seed table
    assert "| `mmedpo` |" in text and "source/model 6" in text
    assert text.rstrip().endswith("A person's notes.")  # the Reading section survives re-collection

    table = list(csv.DictReader(open(csv_path)))
    assert [r["variant"] for r in table] == ["sft", "dpo", "wdpo_mmedpo"]
    assert float(table[2]["invented_box_rate/seed1"]) == pytest.approx(0.2)
    assert table[0]["invented_box_rate/std"] == ""


def test_no_finished_runs_is_an_error(abl, tmp_path):
    with pytest.raises(SystemExit, match="no finished DPO runs"):
        abl.collect(tmp_path, tmp_path / "sft", [], tmp_path / "r.md", tmp_path / "r.csv", "")


def test_commands_cover_every_variant_with_one_sweep_each(abl, tmp_path):
    a = argparse.Namespace(
        quick=False,
        sft_dir=None,
        sft_steps=None,
        sft_warmup=100,
        dpo_steps=None,
        lr=1e-3,
        seeds=[0, 1, 2],
        train_records=100,
        test_records=50,
        launcher="submitit_slurm",
        overrides=["trainer.foo=1"],
    )
    cmds = abl.commands(a, tmp_path)
    assert set(cmds["dpo"]) == set(abl.VARIANTS) and set(cmds["curate"]) == set(abl.PREF_SETS)
    for row, cmd in cmds["dpo"].items():
        _, pref, norm = abl.VARIANTS[row]
        assert "-m" in cmd and "seed=0,1,2" in cmd and f"stage.weight_norm={norm}" in cmd
        assert f"data.root={tmp_path / 'pref' / pref}" in cmd and f"model.init_from={tmp_path / 'sft'}" in cmd
        assert "hydra/launcher=submitit_slurm" in cmd and cmd[-1] == "trainer.foo=1"
        assert "data.max_samples={val:64,test:50}" in cmd
    assert (
        "eval.split=val" in cmds["sft"]
        and "model.vision_pretrain.steps=100" in cmds["sft"]
        and "max_samples=50" in cmds["sft_eval"]
    )
    assert "builder.visual=null" in cmds["curate"]["text"] and "builder.text=null" in cmds["curate"]["visual"]
    assert "builder.visual.mode=global" in cmds["curate"]["global"]
    assert all(f"model.init_from={tmp_path / 'sft'}" in c for c in cmds["curate"].values())


def _sections(text: str) -> dict[str, str]:
    return {s.split("\n", 1)[0]: s for s in text.split("\n## ")[1:]}


def test_committed_tables_come_back_from_their_per_seed_values(abl, tmp_path):
    """experiments/results/mmedpo_ablation.csv keeps every run's test metrics: run dirs rebuilt from
    them and collected through unveil.report give the committed CSV byte for byte and the committed
    Markdown tables digit for digit (the runs themselves are not in the repository)."""
    committed_csv = ROOT / "experiments" / "results" / "mmedpo_ablation.csv"
    out = tmp_path / "abl"
    for r in csv.DictReader(open(committed_csv, encoding="utf-8")):
        if r["variant"] == "sft":
            (out / "sft_test").mkdir(parents=True)
            metrics = {f"test/{k}": float(r[f"{k}/mean"]) for k in abl.METRICS}
            (out / "sft_test" / "metrics.json").write_text(json.dumps(metrics))
            continue
        for seed in r["seeds"].split():
            metrics = {k: float(r[f"{k}/seed{seed}"]) if r[f"{k}/seed{seed}"] else None for k in abl.METRICS}
            _run(out / "dpo" / r["variant"] / f"seed{seed}", int(seed), r["weight_norm"], metrics, pref=r["pref"])
    md, csv_path = tmp_path / "r.md", tmp_path / "r.csv"
    abl.collect(out, out / "sft_test", ["python experiments/mmedpo_ablation.py"], md, csv_path, "a note")

    assert csv_path.read_text() == committed_csv.read_text()
    new, old = _sections(md.read_text()), _sections(committed_csv.with_suffix(".md").read_text())
    for title in (
        "Test split, mean ± std over seeds (the SFT row is one run)",
        "Per seed: invented-box rate / closed VQA acc / matched IoU",
    ):
        assert new[title].strip() == old[title].strip(), title
    assert (out / "report" / "report.md").exists()  # the generic report beside the tables
