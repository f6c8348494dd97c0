"""python -m unveil.report: runs grouped by the overrides that differ, seeds folded, the paired
bootstrap against a baseline row, and the md / csv / png files, on hand-made runs and a debug sweep."""

from __future__ import annotations

import csv
import json
import math
import random
import statistics
from pathlib import Path

import pytest
from conftest import load_experiment

from unveil.report import (
    build_report,
    find_runs,
    fmt,
    group_runs,
    paired_bootstrap,
    parse_overrides,
    record_terms,
    select_group,
    shared_overrides,
    write_report,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _run(d: Path, overrides: list[str], metrics: dict, preds: list[dict] | None = None, choices=None) -> Path:
    """A run dir as a Hydra job leaves it: overrides (and the group choices), metrics, predictions."""
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if choices:
        (d / ".hydra" / "hydra.yaml").write_text(json.dumps({"hydra": {"runtime": {"choices": choices}}}))
    (d / "metrics.json").write_text(json.dumps(metrics))
    if preds is not None:
        (d / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    return d


def test_parse_overrides():
    got = parse_overrides(["seed=1", "+trainer.foo=a=b", "~callbacks.x", "++data.root=/d", "m={a:1,b:2}"])
    assert got == {"seed": "1", "trainer.foo": "a=b", "callbacks.x": "<deleted>", "data.root": "/d", "m": "{a:1,b:2}"}


def test_groups_fold_seeds_and_are_named_by_what_differs(tmp_path):
    sft = _run(tmp_path / "sft", ["data.n=8", "experiment=umed_sft"], {"test/iou": 0.5}, choices={"reward": "none"})
    for reward, ious in (("umed", (0.6, 0.7, 0.8)), ("relevance_only", (0.4, 0.6))):
        for seed, iou in enumerate(ious):
            _run(
                tmp_path / "rl" / reward / f"seed{seed}",
                ["data.n=8", "experiment=umed_ppo", f"reward={reward}", f"seed={seed}", f"model.init_from={sft}"],
                {"test/iou": iou},
            )
    runs = find_runs([tmp_path / "sft", tmp_path / "rl"])  # the order of the paths: SFT first
    groups = group_runs(runs)
    assert [len(g.runs) for g in groups] == [1, 2, 3]  # rl/relevance_only sorts before rl/umed
    assert groups[0].label == "experiment=umed_sft reward=none"  # an unset group shows Hydra's choice
    assert groups[2].label == "experiment=umed_ppo reward=umed model.init_from=sft"  # a path: its last part
    assert groups[2].seeds == [0, 1, 2]
    mean, std = groups[2].stat("test/iou")
    assert mean == pytest.approx(0.7) and std == pytest.approx(0.1)
    mean, std = groups[0].stat("test/iou")
    assert mean == 0.5 and math.isnan(std)  # one run: no spread to show
    assert shared_overrides(runs) == {"data.n": "8"}
    assert select_group(groups, "experiment=umed_sft") == 0 and select_group(groups, "reward=umed") == 2
    assert select_group(groups, "reward=none") == 0  # the option Hydra chose, not overridden
    assert select_group(groups, "-1") == 2 and select_group(groups, groups[1].label) == 1
    with pytest.raises(ValueError, match="fits 2 rows; name one of: 0: experiment=umed_sft"):
        select_group(groups, "experiment=umed_ppo")
    with pytest.raises(FileNotFoundError, match="no finished run"):
        find_runs([tmp_path / "rl" / "umed" / "seed0" / ".hydra"])


def test_record_terms_add_up_to_the_grounding_metrics():
    """The bootstrap recomputes metrics from predictions.jsonl: on all records its sums must be the
    evaluation's own (GroundingMetrics), metric by metric."""
    from unveil.eval.metrics import GroundingMetrics
    from unveil.eval.parse import Prediction

    rnd = random.Random(0)
    m, records = GroundingMetrics(), []

    def box():
        x, y = rnd.random() * 0.6, rnd.random() * 0.6
        return (x, y, x + 0.1 + rnd.random() * 0.3, y + 0.1 + rnd.random() * 0.3)

    for _ in range(300):
        gt = [box() for _ in range(rnd.choice([0, 0, 1, 1, 2]))]
        pred_boxes = [box() for _ in range(rnd.choice([0, 1, 1, 2, 3]))]
        labels = [rnd.choice(["mass", "cyst", None]) for _ in pred_boxes]
        pred = Prediction(boxes=pred_boxes, labels=labels, abnormal=bool(pred_boxes) or rnd.random() < 0.2)
        scores = m.update_study(pred, gt, [rnd.choice(["mass", "cyst"]) for _ in gt])
        records.append({"task": "localize", **scores, "pred_boxes": pred_boxes, "gt_boxes": gt})
    for task in ["vqa_closed"] * 40 + ["mcq"] * 30:
        ok = rnd.random() < 0.6
        (m.update_mcq if task == "mcq" else m.update_closed)(ok)
        records.append({"task": task, "correct": ok})
    want = m.compute()
    for name in ("iou", "iou_strict", "acc50", "finding_acc", "presence_acc", "fpr_normal", "invented_box_rate"):
        terms = [record_terms(r).get(name, (0.0, 0.0)) for r in records]
        assert sum(t[0] for t in terms) / sum(t[1] for t in terms) == pytest.approx(want[name], abs=1e-12), name
    for name in ("closed_acc", "mcq_acc"):
        terms = [record_terms(r).get(name, (0.0, 0.0)) for r in records]
        assert sum(t[0] for t in terms) / sum(t[1] for t in terms) == pytest.approx(want[name]), name


def _study_records(ious: list[float], closed: list[bool]) -> list[dict]:
    """Two records per image (one study): a localisation with its IoU and a closed question."""
    out = []
    for i, (iou, ok) in enumerate(zip(ious, closed)):
        img = [f"/data/images/p{i}.png"]
        out.append({"id": f"p{i}-loc", "task": "localize", "images": img, "iou": iou, "gt_boxes": [[0, 0, 1, 1]]})
        out.append({"id": f"p{i}-q", "task": "vqa_closed", "images": img, "correct": ok})
    return out


def test_paired_bootstrap_interval_is_the_paired_one(tmp_path):
    rnd = random.Random(1)
    n = 150
    base_iou = [rnd.uniform(0.2, 0.8) for _ in range(n)]
    closed = [rnd.random() < 0.7 for _ in range(n)]
    _run(tmp_path / "a", ["x=base"], {"test/iou": statistics.mean(base_iou)}, _study_records(base_iou, closed))
    row_means = []
    for seed in (0, 1):  # every study 0.05 better, give or take 0.02: a shift the test set resolves
        ious = [min(1.0, v + 0.05 + rnd.uniform(-0.02, 0.02)) for v in base_iou]
        row_means.append(statistics.mean(ious))
        _run(
            tmp_path / "b" / str(seed),
            ["x=new", f"seed={seed}"],
            {"test/iou": row_means[-1]},
            _study_records(ious, closed),
        )
    groups = group_runs(find_runs([tmp_path / "a", tmp_path / "b"]))
    deltas = paired_bootstrap(groups, 0, ["iou", "closed_acc"], n_boot=1000, seed=3)
    d = deltas[(1, "iou")]
    assert d.n_studies == n  # the two records of an image are one study
    assert d.diff == pytest.approx(statistics.mean(row_means) - statistics.mean(base_iou))  # = metrics.json's
    assert 0 < d.lo < d.diff < d.hi and d.hi - d.lo < 0.01  # unpaired, the interval would be ~0.08 wide
    assert deltas[(1, "closed_acc")].diff == 0 and deltas[(1, "closed_acc")].hi == 0  # the same answers
    assert deltas[(0, "iou")].diff == 0
    again = paired_bootstrap(groups, 0, ["iou"], n_boot=1000, seed=3)[(1, "iou")]
    assert (again.lo, again.hi) == (d.lo, d.hi)  # seeded draws

    # a run scored on other test records cannot be paired: no number rather than a wrong one
    _run(tmp_path / "c", ["x=other"], {"test/iou": 0.5}, _study_records(base_iou[:-1], closed[:-1]))
    groups = group_runs(find_runs([tmp_path / "a", tmp_path / "c"]))
    other = paired_bootstrap(groups, 0, ["iou"], n_boot=100)[(1, "iou")]
    assert math.isnan(other.diff) and "other test records" in other.reason and str(tmp_path / "c") in other.reason


def test_report_files_and_reading_kept(tmp_path):
    ious = [0.5, 0.7, 0.9, 0.3]
    for seed, shift in enumerate((0.0, 0.1)):
        m = {
            "test/iou": statistics.mean(ious) + shift,
            "test/modality/ct/iou": 0.4 + shift,
            "test/modality/xray/iou": 0.8,
        }
        m.update(
            {
                "test/ability/temporal/mcq_acc": 0.5 + shift,
                "test/ability/comparison/mcq_acc": 1.0,
                "train/loss": 1.0 + seed,
            }
        )
        _run(
            tmp_path / "runs" / f"s{seed}", [f"seed={seed}"], m, _study_records([v + shift for v in ious], [True] * 4)
        )
    report = build_report([tmp_path / "runs"], n_boot=100)
    assert len(report.groups) == 1 and report.groups[0].label == "all runs"
    paths = write_report(report, tmp_path / "out", command="python -m unveil.report runs")
    assert {"md", "csv", "bars", "modality", "ability"} <= set(paths) and "curves" not in paths  # no csv/metrics.csv
    assert all(paths[k].read_bytes()[:8] == PNG for k in ("bars", "modality", "ability"))
    row = next(csv.DictReader(open(paths["csv"])))
    assert float(row["modality/average/iou/mean"]) == pytest.approx(statistics.mean([0.6, 0.65]))  # per run first
    assert float(row["modality/ct/iou/std"]) == pytest.approx(statistics.stdev([0.4, 0.5]))
    text = paths["md"].read_text()
    assert "| 0 | all runs | 2 | 0 1 | " + fmt(*report.groups[0].stat("test/iou")) in text
    assert "## `mcq_acc` per ability" in text and "![bars](bars.png)" in text
    paths["md"].write_text(text + "The reading a person wrote.\n")
    write_report(report, tmp_path / "out")
    assert paths["md"].read_text().rstrip().endswith("The reading a person wrote.")


def test_umed_ablation_table_through_the_report(tmp_path):
    """experiments/umed_ablation.py: rows by Hydra's experiment / reward choice, per-modality values
    and their average per seed, then mean ± std over seeds."""
    abl = load_experiment("umed_ablation")
    out = tmp_path / "abl"
    _run(out / "sft", ["experiment=umed_sft"], {"test/modality/ct/iou": 0.6, "test/modality/xray/iou": 0.4})
    vals = {("umed_grpo", "umed"): [(0.7, 0.5), (0.9, 0.5)], ("umed_ppo", "relevance_only"): [(0.5, None)]}
    for (exp, reward), per_seed in vals.items():
        for seed, (ct, xray) in enumerate(per_seed):
            m = {"test/modality/ct/iou": ct, "test/modality/xray/iou": xray}
            choices = {"experiment": exp, "reward": reward}
            _run(out / "rl" / exp / reward / f"seed{seed}", [f"experiment={exp}", f"seed={seed}"], m, choices=choices)
    groups = abl.rl_groups(out / "rl")
    sft = abl.read_run(out / "sft")
    mods = abl.modalities([sft, *[r for g in groups.values() for r in g.runs]])
    rows = abl.table_rows(sft, groups, mods)
    assert mods == ["ct", "xray"] and [r["algo"] for r in rows] == ["SFT", "PPO", "GRPO"]  # ALGOS order
    assert rows[0]["iou/average/mean"] == pytest.approx(0.5) and math.isnan(rows[0]["iou/average/std"])
    grpo = rows[2]
    assert grpo["n_seeds"] == 2 and grpo["iou/ct/mean"] == pytest.approx(0.8)
    assert grpo["iou/average/mean"] == pytest.approx(0.65) and grpo["iou/average/std"] == pytest.approx(
        statistics.stdev([0.6, 0.7])
    )
    assert rows[1]["iou/average/mean"] == pytest.approx(0.5)  # a missing modality leaves the average to the others
    md = tmp_path / "t.md"
    abl.write_tables(rows, mods, ["python experiments/umed_ablation.py"], md, tmp_path / "t.csv", "note")
    assert "| GRPO | full (relevance + localisation + vision relevance) | 2 | 0.800 ± 0.141 | 0.500 ± 0.000 |" in (
        md.read_text()
    )


@pytest.mark.slow
def test_report_on_a_debug_sweep_equals_the_runs_metrics(debug_sweep, tmp_path):
    """The command on a real sweep (an SFT run, then GRPO from it over two seeds): the files, the
    rows, and numbers that are the runs' own metrics.json values."""
    from unveil.report.__main__ import main

    out = tmp_path / "rep"
    paths = main([str(debug_sweep / "sft"), str(debug_sweep / "rl"), "--out", str(out), "--bootstrap", "200"])
    assert {"md", "csv", "bars", "delta", "modality", "curves"} <= set(paths)
    for k in ("bars", "delta", "modality", "curves"):
        assert paths[k].read_bytes()[:8] == PNG and paths[k].stat().st_size > 5000, k
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert [r["n_runs"] for r in rows] == ["1", "2"] and rows[1]["seeds"] == "0 1" and rows[0]["baseline"] == "1"
    assert "stage=sft" in rows[0]["label"] and "stage=grpo" in rows[1]["label"] and "peft=lora" in rows[1]["label"]
    run_dirs = [[debug_sweep / "sft"], [debug_sweep / "rl" / "0", debug_sweep / "rl" / "1"]]
    for row, dirs in zip(rows, run_dirs):
        ms = [json.loads((d / "metrics.json").read_text()) for d in dirs]
        keys = ["test/iou", "test/presence_acc", "test/n_studies", "train/loss", "val/loss"]
        keys += ["train/reward", "train/kl"] if len(dirs) > 1 else []
        for key in keys:
            name = key.removeprefix("test/")
            assert float(row[f"{name}/mean"]) == pytest.approx(statistics.mean(m[key] for m in ms)), key
            if len(dirs) > 1:
                assert float(row[f"{name}/std"]) == pytest.approx(statistics.stdev(m[key] for m in ms)), key
    ious = [[json.loads((d / "metrics.json").read_text())["test/iou"] for d in dirs] for dirs in run_dirs]
    assert float(rows[1]["iou/delta"]) == pytest.approx(statistics.mean(ious[1]) - ious[0][0])
    text = (out / "report.md").read_text()
    assert fmt(float(rows[1]["train/reward/mean"]), float(rows[1]["train/reward/std"])) in text
    assert "![curves](curves.png)" in text and "rl/1` | 1 | 1 |" in text
