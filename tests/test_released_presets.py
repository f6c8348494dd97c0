"""`data=slake` and `data=vqa_rad` load the released SLAKE 1.0 and VQA-RAD with nothing but data.root.

The fixtures under tests/fixtures/released/ are written in the released files' layout and record
shape (SLAKE: Slake1.0/{train,validate,test}.json + imgs/xmlab<N>/source.jpg, bilingual rows, an
empty answer as in train.json record [1622]; VQA-RAD: "VQA_RAD Dataset Public.json" + "VQA_RAD Image
Folder/", the test split told by phrase_type); their questions and images are made up.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, compose

from unveil.data.records import load_records

RELEASED = ROOT / "tests" / "fixtures" / "released"


def _records(preset: str, root: Path):
    cfg = compose([f"data={preset}", f"data.root={root}", "data.num_workers=0"])
    return cfg, load_records(cfg.data)


def test_slake_preset_english_rows_image_dir_and_bad_records_skipped_by_name(tmp_path, caplog):
    root = shutil.copytree(RELEASED / "Slake1.0", tmp_path / "Slake1.0")
    with caplog.at_level("WARNING"):
        cfg, records = _records("slake", root)
    assert [s.id for s in records.data["train"]] == ["0", "1", "4"]  # English, the empty answer skipped
    assert [s.id for s in records.data["val"]] == ["10"] and [s.id for s in records.data["test"]] == ["20", "21", "22"]
    assert records.data["train"][0].images == [str(root / "imgs" / "xmlab1" / "source.jpg")]
    assert [s.task for s in records.data["test"]] == ["vqa_open", "vqa_closed", "vqa_open"]
    assert records.counts() == {
        "data/skipped_train": 1.0,
        "data/skipped_val": 0.0,
        "data/skipped_test": 0.0,
        "data/dropped_other_language_train": 2.0,
        "data/dropped_other_language_val": 1.0,
        "data/dropped_other_language_test": 1.0,
    }
    assert f"{root / 'train.json'} record [3] field 'answer': empty answer" in caplog.text


def test_vqa_rad_preset_splits_its_one_file_by_phrase_type(tmp_path):
    root = shutil.copytree(RELEASED / "VQA_RAD", tmp_path / "VQA_RAD")
    _, records = _records("vqa_rad", root)
    assert [s.id for s in records.data["train"]] == ["0", "1", "2", "3"] and "val" not in records.data
    assert [s.id for s in records.data["test"]] == ["4", "5", "6"]
    assert {s.meta["phrase_type"] for s in records.data["test"]} == {"test_freeform", "test_para"}
    assert (
        records.data["train"][2].answer == "2" and records.data["train"][2].task == "vqa_open"
    )  # a number in the file
    assert records.data["test"][0].images == [str(root / "VQA_RAD Image Folder" / "synpic42202.jpg")]
    assert records.counts()["data/dropped_where_train"] == 3.0 and records.counts()["data/dropped_where_test"] == 4.0


def test_a_misspelt_split_option_fails_before_any_file_is_read():
    """split_options are adapter options: their keys are checked against the adapter's read."""
    cfg = compose(["data=vqa_rad", "data.root=/nonexistent", "+data.split_options.test.wher={phrase_type: x}"])
    with pytest.raises(
        ValueError, match=r"data.split_options.test: unknown key\(s\) \['wher'\].*did you mean 'where'"
    ):
        load_records(cfg.data)


def test_skipping_bad_records_is_the_default_of_these_presets_only():
    for preset in ("slake", "vqa_rad"):
        assert compose([f"data={preset}", "data.root=/x"]).data.on_bad_record == "skip"
    for preset in ("vqa_table", "mau_jsonl", "llava", "med_mim", "mmedpo"):
        assert compose([f"data={preset}", "data.root=/x"]).data.on_bad_record == "raise"


def test_debug_run_on_released_slake_with_only_data_root(tmp_path):
    """The command of the README's table, smoke-sized: trains, scores the open and closed questions,
    counts the skipped record, and leaves the data folder as it was."""
    from test_user_data import tree

    from unveil.train import train

    root = shutil.copytree(RELEASED / "Slake1.0", tmp_path / "user" / "Slake1.0")
    before = tree(root)
    cfg = compose(
        ["debug=fast", "data=slake", f"data.root={root}", "data.num_workers=0", "trainer.max_steps=1"], tmp=tmp_path
    )
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data/skipped_train"] == 1 and metrics["data/dropped_other_language_test"] == 1
    assert metrics["test/n_open"] == 2 and metrics["test/n_closed"] == 1
    assert "test/open_recall" in metrics and "test/task/vqa_open/open_em" in metrics
    assert tree(root) == before


def test_mmedpo_identical_pairs_are_counted_in_the_run_metrics():
    cfg = compose(
        [
            "data=mmedpo",
            f"data.root={ROOT / 'tests' / 'fixtures' / 'formats' / 'mmedpo'}",
            "data.splits.train=slake_dpo_weighted.scaffold.json",
            "data.check_images=false",
            "data.num_workers=0",
        ]
    )
    records = load_records(cfg.data)
    assert len(records.data["train"]) == 9 and records.counts() == {
        "data/skipped_train": 0.0,
        "data/dropped_identical_pair_train": 2.0,
    }
