"""Reading finished runs back (unveil.eval.runs); tests/test_notebooks.py runs the notebook built on it."""

import json
from pathlib import Path

import pytest
from PIL import Image

from unveil.eval.runs import (
    OLD_METRIC_NAMES,
    compare,
    current_names,
    draw_study,
    load_run,
    localisation_breakdown,
    metric_name,
)

ROOT = Path(__file__).resolve().parents[1]


def _fake_run(d: Path, iou_scale: float = 1.0) -> Path:
    d.mkdir(parents=True)
    Image.new("RGB", (64, 64), (0, 0, 0)).save(d / "img.png")
    img = [str(d / "img.png")]
    preds = [
        # one GT box, found (IoU 0.8)
        {
            "id": "a",
            "task": "localize",
            "modality": "ct",
            "images": img,
            "iou": 0.8 * iou_scale,
            "iou_strict": 0.8 * iou_scale,
            "gt_boxes": [[0.25, 0.25, 0.5, 0.5]],
            "gt_findings": ["mass"],
            "pred_boxes": [[0.25, 0.25, 0.5, 0.5]],
            "pred_labels": ["mass"],
        },
        # one GT box, answered with two: strict IoU halves
        {
            "id": "b",
            "task": "localize",
            "modality": "ct",
            "images": img,
            "iou": 0.6,
            "iou_strict": 0.3,
            "gt_boxes": [[0.1, 0.1, 0.2, 0.2]],
            "gt_findings": ["cyst"],
            "pred_boxes": [[0.1, 0.1, 0.2, 0.2], [0.6, 0.6, 0.7, 0.7]],
            "pred_labels": ["cyst", "mass"],
        },
        # two GT boxes, one predicted
        {
            "id": "c",
            "task": "localize",
            "modality": "xray",
            "images": img,
            "iou": 0.4,
            "iou_strict": 0.4,
            "gt_boxes": [[0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.9, 0.9]],
            "gt_findings": ["mass", "cyst"],
            "pred_boxes": [[0.1, 0.1, 0.3, 0.3]],
            "pred_labels": ["mass"],
        },
        # a normal study and a closed question: not localisation
        {"id": "d", "task": "localize", "modality": "xray", "images": img, "gt_boxes": [], "pred_boxes": []},
        {"id": "e", "task": "vqa_closed", "modality": "ct", "images": img, "correct": True},
    ]
    for r in preds:  # as unveil.eval writes them
        r.update(prediction=" Abnormality detected.", reference="Abnormality detected. Region [10, 10, 20, 20]: cyst.")
    (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preds))
    metrics = {
        "test/iou": 0.6 * iou_scale,
        "test/acc50": 0.75,
        "test/modality/ct/iou": 0.7,
        "test/modality/xray/iou": 0.4,
        "test/modality/ct/acc50": 1.0,
        "test/modality/xray/acc50": 0.5,
        "vision_warmup/val_pool_iou": 0.7,
        # an RL run from before the metrics took TRL's names
        "reward/total/mean": 1.5,
        "reward/localization/mean": 0.7,
        "reward/localization/zero_spread_frac": 0.25,
        "train/clip_frac": 0.1,
        "train/kl": 0.01,
        "val/reward/total/mean": 1.2,
    }
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def test_load_run_table_and_worst(tmp_path):
    d = _fake_run(tmp_path / "run")
    run = load_run(d / "predictions.jsonl")  # any file inside the run dir finds it
    assert run.path == d and len(run.predictions) == 5 and run.config is None
    assert run.groups() == ["overall", "modality/ct", "modality/xray"]
    rows = {r["group"]: r for r in run.table()}
    assert rows["overall"] == {"group": "overall", "iou": 0.6, "acc50": 0.75}
    assert rows["modality/xray"]["iou"] == 0.4
    assert [r["id"] for r in run.worst(2)] == ["c", "b"]
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        load_run(tmp_path)


def test_localisation_breakdown_hand_computed(tmp_path):
    run = load_run(_fake_run(tmp_path / "run"))
    rows = {(r["gt_boxes"], r["pred_boxes"]): r for r in localisation_breakdown(run.predictions)}
    assert set(rows) == {(1, 1), (1, 2), (2, 1)}  # the normal study and the closed question are not counted
    assert rows[(1, 2)]["iou"] == pytest.approx(0.6) and rows[(1, 2)]["iou_strict"] == pytest.approx(0.3)
    assert rows[(2, 1)]["share"] == pytest.approx(1 / 3) and rows[(2, 1)]["iou_lost"] == pytest.approx(0.6 / 3)
    # the groups' losses add up to 1 - mean IoU
    assert sum(r["iou_lost"] for r in rows.values()) == pytest.approx(1 - (0.8 + 0.6 + 0.4) / 3)


def test_draw_study_colours_gt_green_and_prediction_red(tmp_path):
    run = load_run(_fake_run(tmp_path / "run"))
    b = next(r for r in run.predictions if r["id"] == "b")
    im = draw_study(b, size=100)
    assert im.size == (100, 100)
    assert im.getpixel((60, 65)) == (230, 30, 30)  # left edge of the extra predicted box, drawn red
    assert im.getpixel((5, 5)) == (0, 0, 0)  # background untouched
    c = next(r for r in run.predictions if r["id"] == "c")
    assert draw_study(c, size=100).getpixel((60, 75)) == (0, 200, 0)  # the missed GT box, green
    with pytest.raises(ValueError, match="no 'images' path"):
        draw_study({"id": "x", "gt_boxes": []})


def test_compare_runs(tmp_path):
    a, b = load_run(_fake_run(tmp_path / "a")), load_run(_fake_run(tmp_path / "b", iou_scale=0.5))
    rows = compare([a, b])
    assert [r["run"] for r in rows] == ["a", "b"]
    nested = (
        load_run(_fake_run(tmp_path / "sweep" / "ppo" / "seed0")),
        load_run(_fake_run(tmp_path / "sweep" / "grpo" / "seed0")),
    )
    assert [r["run"] for r in compare(list(nested))] == ["ppo/seed0", "grpo/seed0"]  # not "seed0" twice
    assert rows[0]["overall"] == 0.6 and rows[1]["overall"] == pytest.approx(0.3) and rows[1]["modality/xray"] == 0.4


def test_old_metric_names_read_under_trl_names(tmp_path):
    run = load_run(_fake_run(tmp_path / "run"))
    assert run.metrics["train/reward"] == 1.5 and run.metrics["val/reward"] == 1.2
    assert run.metrics["train/rewards/localization/mean"] == 0.7
    assert run.metrics["train/rewards/localization/frac_zero_std"] == 0.25
    assert run.metrics["train/clip_ratio/region_mean"] == 0.1 and run.metrics["train/kl"] == 0.01
    assert not any(k.startswith("reward/") or k.endswith("clip_frac") for k in run.metrics)
    assert run.metrics["test/iou"] == 0.6  # untouched
    # every old name maps to a current one; current names (DPO's included) map to themselves
    assert metric_name("val/reward/vision_relevance/applicable_frac") == "val/rewards/vision_relevance/applicable_frac"
    assert metric_name("time/step_s") == "train/time/step_s"
    for new in ("train/reward", "train/rewards/chosen", "val/rewards/margins", "train/completions/mean_length"):
        assert metric_name(new) == new
    assert all(
        metric_name(old.replace("<h>", "x")) == new.replace("<h>", "x") for old, new in OLD_METRIC_NAMES.items()
    )
    # where a run has both, the current name's value wins
    assert current_names({"reward/total/mean": 1.0, "train/reward": 2.0}) == {"train/reward": 2.0}
