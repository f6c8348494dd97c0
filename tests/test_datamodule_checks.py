"""What the datamodule checks across splits and applies to batches: a training id in val/test is an
error by default; records too long for ``data.max_tokens`` are refused (or skipped and counted)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from unveil.data.adapters import mau_jsonl, vqa_table
from unveil.data.errors import RecordError
from unveil.data.records import RecordSet


def rec(i, **kw) -> dict:
    r = {"id": f"r{i}", "images": ["images/a.png"], "query": "Is there an abnormality?", "answer": "no"}
    r.update(kw)
    return r


def write_splits(root: Path, splits: dict[str, list[dict]]) -> Path:
    (root / "images").mkdir(exist_ok=True)
    Image.new("RGB", (32, 32), "gray").save(root / "images" / "a.png")
    for name, recs in splits.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


def dm(root: Path, **kw) -> RecordSet:
    return RecordSet(root=str(root), adapter=mau_jsonl.read, **kw)


# ------------------------------------------------------------------------------------------
# train / val / test id overlap
# ------------------------------------------------------------------------------------------
def test_a_training_id_in_test_is_an_error_naming_the_files_and_ids(tmp_path):
    write_splits(
        tmp_path,
        {"train": [rec(i) for i in range(6)], "val": [rec(10)], "test": [rec(20), rec(3), rec(21), rec(1)]},
    )
    with pytest.raises(RecordError) as e:
        dm(tmp_path).load()
    msg = str(e.value)
    assert e.value.file == str(tmp_path / "test.jsonl") and e.value.field == "id"
    assert str(tmp_path / "train.jsonl") in msg and "2 record id(s)" in msg and "['r1', 'r3']" in msg
    assert "data.allow_split_overlap" in msg


def test_allow_split_overlap_warns_and_loads(tmp_path, caplog):
    write_splits(tmp_path, {"train": [rec(1), rec(2)], "val": [rec(2)], "test": [rec(3)]})
    d = dm(tmp_path, allow_split_overlap=True)
    with caplog.at_level(logging.WARNING):
        d.load()
    assert [s.id for s in d.data["val"]] == ["r2"] and "allow_split_overlap=true" in caplog.text


def test_disjoint_splits_and_ids_made_from_positions_pass(tmp_path):
    write_splits(tmp_path, {"train": [rec(1), rec(2)], "val": [rec(3)], "test": [rec(4)]})
    d = dm(tmp_path)
    d.load()
    assert {k: len(v) for k, v in d.data.items()} == {"train": 2, "val": 1, "test": 1}
    # a table without an id column: row numbers repeat in every file and name nothing
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    for name in ("train", "test"):
        (tmp_path / f"{name}.csv").write_text("image,question,answer\nx.png,is it?,yes\nx.png,where?,left\n")
    d = RecordSet(root=str(tmp_path), adapter=vqa_table.read, splits={"train": "train.csv", "test": "test.csv"})
    d.load()
    assert [s.id for s in d.data["test"]] == ["2", "3"]
    # with an id column the ids count
    for name, qid in (("train", 7), ("test", 7)):
        (tmp_path / f"{name}.csv").write_text(f"qid,image,question,answer\n{qid},x.png,is it?,yes\n")
    d = RecordSet(root=str(tmp_path), adapter=vqa_table.read, splits={"train": "train.csv", "test": "test.csv"})
    with pytest.raises(RecordError, match=r"\['7'\]"):
        d.load()


def test_the_synthetic_sets_have_no_overlap(tmp_path):
    from unveil.data.synthetic import SyntheticConfig
    from unveil.data.synthetic.multi_image import MultiImageConfig

    d = RecordSet(root=str(tmp_path / "syn"), adapter=mau_jsonl.read, synthetic=SyntheticConfig(n_patients=30, seed=1))
    d.load()
    assert set(d.data) == {"train", "val", "test"}
    d = RecordSet(
        root=str(tmp_path / "mim"), adapter=mau_jsonl.read, synthetic=MultiImageConfig(n_patients=30, seed=1)
    )
    d.load()
    assert set(d.data) == {"train", "val", "test"}


# ------------------------------------------------------------------------------------------
# data.max_tokens
# ------------------------------------------------------------------------------------------
def test_a_huge_query_is_skipped_and_counted_by_default(tmp_path):
    huge = rec(2, query="opacity " * 1_000_000)  # 8 MB: far past 4096 tokens
    write_splits(tmp_path, {"train": [rec(1), huge, rec(3)], "val": [rec(4)], "test": [rec(5)]})
    with pytest.raises(RecordError, match="data.max_tokens=4096") as e:
        dm(tmp_path).load()
    assert (e.value.file, e.value.record, e.value.field) == (str(tmp_path / "train.jsonl"), 2, "query")
    d = dm(tmp_path, on_bad_record="skip")
    d.load()
    assert [s.id for s in d.data["train"]] == ["r1", "r3"] and d.skipped == {"train": 1, "val": 0, "test": 0}
    d = dm(tmp_path, max_tokens=None)  # null: no limit
    d.load()
    assert len(d.data["train"]) == 3


@pytest.fixture(scope="module")
def tiny_bb(tmp_path_factory, synthetic_dir):
    from conftest import compose

    from unveil.data.adapters import mau_jsonl
    from unveil.models.factory import build_backbone

    tmp = tmp_path_factory.mktemp("bb")
    cfg = compose([], tmp=tmp)
    samples = mau_jsonl.read(synthetic_dir / "train.jsonl")
    bb = build_backbone(cfg.model, corpus=[m["content"] for s in samples for m in s.messages], cache_dir=tmp / "c")
    return bb, [s for s in samples if s.task == "localize" and s.boxes][:2]


def test_sft_collator_applies_max_length_keeping_the_start(tiny_bb):
    from unveil.data.collate import IGNORE, SFTCollator

    bb, samples = tiny_bb
    full = SFTCollator(bb)(samples)
    lengths = full["attention_mask"].sum(1)
    first_label = max(int((row != IGNORE).nonzero()[0]) for row in full["labels"])
    n = first_label + 2  # the prompt and images whole, two answer tokens of the longest prompt
    assert n < int(lengths.min())
    cut = SFTCollator(bb, max_length=n)(samples)
    assert cut["input_ids"].shape[1] == n and cut["labels"].shape[1] == n
    assert torch.equal(cut["input_ids"], full["input_ids"][:, :n]) and torch.equal(
        cut["labels"], full["labels"][:, :n]
    )
    assert ((cut["labels"] != IGNORE).sum(1) > 0).all()
    start = int((full["labels"][0] != IGNORE).nonzero()[0])  # the prompt of sample 0 fills max_length
    with pytest.raises(ValueError, match="no answer tokens left"):
        SFTCollator(bb, max_length=start)(samples[:1])
    image_token = bb.base_model.config.image_token_index
    last_image = int((full["input_ids"][0] == image_token).nonzero()[-1])
    with pytest.raises(ValueError, match="cuts through the image tokens"):
        SFTCollator(bb, max_length=last_image)(samples[:1])


def test_the_datamodule_gives_training_collators_max_tokens(tiny_bb, tmp_path):
    from unveil.data.collate import PromptCollator, SFTCollator
    from unveil.data.collate_pref import PreferenceCollator
    from unveil.data.datamodule import UnveilDataModule

    bb, _ = tiny_bb
    write_splits(tmp_path, {"train": [rec(1)], "val": [rec(2)], "test": [rec(3)]})
    records = dm(tmp_path, max_tokens=300).load()
    d = UnveilDataModule(records, SFTCollator(bb))
    d.train_dataloader(), d.val_dataloader()
    assert d.collate_fn.max_length == 300
    assert UnveilDataModule(records, PromptCollator(bb)).collate_fn.max_length is None  # generation needs it whole
    d = UnveilDataModule(records, PreferenceCollator(bb, max_length=128))  # the stage's own setting wins
    d.train_dataloader()
    assert d.collate_fn.max_length == 128
