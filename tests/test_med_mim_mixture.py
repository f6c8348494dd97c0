"""Med-MIM mixture training (issue 19, item 4): several files per split, per-ability sampling weights,
open `conv` items scored with the open-answer metrics, free text kept out of closed_acc.

The four ability files are the Med-MIM-shaped fixtures in tests/fixtures/formats/med_mim/ (one
conv item, one yes/no question, four multiple-choice questions over 2-3 images)."""

from __future__ import annotations

import json
import math
from collections import Counter

from conftest import ROOT, compose

from unveil.data.datamodule import UnveilDataModule
from unveil.data.records import load_records

FIX = ROOT / "tests" / "fixtures" / "formats"
ABILITY_FILES = [f"med_mim/MedMIM_Held_in_{a}.json" for a in ("Temporal", "Reasoning", "Comparison", "Coreference")]
MIXTURE = [f"data.splits.train=[{','.join(ABILITY_FILES)}]", f"data.splits.test=[{','.join(ABILITY_FILES)}]"]


def test_the_default_med_mim_preset_is_the_mixture_of_the_four_ability_files():
    cfg = compose(["data=med_mim", "data.root=/x"])
    names = [f.split("_")[-1] for f in cfg.data.splits.train]
    assert names == ["Temporal.json", "Reasoning.json", "Comparison.json", "Coreference.json"]
    assert len(cfg.data.splits.test) == 4 and set(cfg.data.sampling_weights.ability) >= {"temporal", "reasoning"}


def test_mixture_reads_every_file_and_draws_by_ability_weight():
    cfg = compose(["data=med_mim", f"data.root={FIX}", "data.num_workers=0", *MIXTURE])
    cfg.data.sampling_weights.ability.temporal = 3.0
    records = load_records(cfg.data)
    abilities = Counter(s.meta["ability"] for s in records.data["train"])
    assert abilities == {"temporal": 2, "reasoning": 1, "comparison": 1, "coreference": 2}
    # expected shares: temporal 2 records x 3 = 6 of 6 + 1 + 1 + 2 = 10
    shares = records.sampling_shares()
    assert math.isclose(shares["ability/temporal"], 0.6) and math.isclose(shares["ability/reasoning"], 0.1)
    loader = UnveilDataModule(records, collate_fn=list).train_dataloader()
    drawn = Counter(s.meta["ability"] for _ in range(60) for batch in loader for s in batch)
    assert abs(drawn["temporal"] / sum(drawn.values()) - 0.6) < 0.05  # 360 draws; unweighted: 1/3
    assert abs(drawn["reasoning"] / sum(drawn.values()) - 0.1) < 0.04


def test_a_med_mim_mixture_trains_and_reports_per_ability_accuracy(tmp_path):
    from unveil.train import train

    cfg = compose(
        ["debug=fast", "data=med_mim", f"data.root={FIX}", "data.num_workers=0", "trainer.max_steps=2", *MIXTURE],
        tmp=tmp_path,
    )
    train(cfg)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in (
        "ability/temporal/mcq_acc",
        "ability/coreference/mcq_acc",
        "ability/reasoning/closed_acc",
        "ability/comparison/open_em",
        "ability/comparison/open_recall",
    ):
        assert m[f"test/{key}"] is not None, key  # scored (metrics.json writes NaN, "not scored", as null)
    # the conv item is open, not exact-matched into closed_acc; only the yes/no question is closed
    assert m["test/n_closed"] == 1 and m["test/n_open"] == 1 and m["test/n_mcq"] == 4
    assert m["test/ability/comparison/closed_acc"] is None
    preds = [json.loads(line) for line in open(tmp_path / "run" / "predictions.jsonl")]
    conv = next(p for p in preds if p["task"] == "vqa_open")
    assert "open_recall" in conv and "correct" not in conv


def test_the_composed_training_file_names_its_ability():
    from pathlib import Path

    from unveil.data.adapters.med_mim import ability_from_name

    assert ability_from_name(Path("Instruction_Dataset/Med_MIM_train_Composed.json")) == ("composed", False)
    assert ability_from_name(Path("Med_MIM_train_inherent_Reasoning.json")) == ("reasoning", False)
