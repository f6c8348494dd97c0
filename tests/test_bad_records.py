"""Bad input that used to pass the load-time checks and fail later (or never): every kind is a
RecordError naming file, line and field under ``on_bad_record=raise``, and is skipped and
counted under ``skip`` with every good record kept."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unveil.data.adapters import llava, mau_jsonl, vqa_table
from unveil.data.errors import RecordError
from unveil.data.images import image_size, load_image


@pytest.fixture
def root(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (200, 100), "gray").save(tmp_path / "images" / "a.png")
    return tmp_path


def good(i: int = 1, **kw) -> dict:
    r = {
        "id": f"r{i}",
        "images": ["images/a.png"],
        "query": "Where is it?",
        "answer": "Region [10, 20, 30, 40]: nodule.",
        "boxes": [[0.1, 0.2, 0.3, 0.4]],
        "findings": ["nodule"],
    }
    r.update(kw)
    return r


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    """One JSONL line per item (dicts are dumped); bytes go in as they are."""
    out = b""
    for x in lines:
        if isinstance(x, dict):
            x = json.dumps(x)
        out += (x if isinstance(x, bytes) else x.encode("utf-8")) + b"\n"
    path.write_bytes(out)
    return path


def raises(path, root, **kw) -> RecordError:
    with pytest.raises(RecordError) as e:
        mau_jsonl.read(path, root=root, **kw)
    return e.value


def skip_ids(path, root, **kw) -> tuple[list[str], int]:
    """(ids of the records kept, number skipped) under on_bad_record=skip."""
    got = mau_jsonl.read(path, root=root, on_bad_record="skip", **kw)
    return [s.id for s in got], got.skipped


def _noise(path: Path, fmt: str, size: int = 64) -> bytes:
    arr = (np.random.default_rng(0).random((size, size, 3)) * 255).astype("uint8")
    Image.fromarray(arr).save(path, fmt)
    return path.read_bytes()


# ------------------------------------------------------------------------------------------
# 2. truncated / corrupt images
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix,fmt", [(".png", "PNG"), (".jpg", "JPEG")])
def test_truncated_image_is_a_record_error_at_load_not_a_crash_in_training(root, suffix, fmt):
    full = _noise(root / "images" / f"ok{suffix}", fmt)
    (root / "images" / f"cut{suffix}").write_bytes(full[: len(full) // 2])
    with pytest.raises(OSError):  # what a DataLoader worker would hit mid-training
        load_image(root / "images" / f"cut{suffix}")
    p = write_lines(
        root / "data.jsonl",
        [good(1), good(2, images=[f"images/cut{suffix}"]), good(3, images=[f"images/ok{suffix}"])],
    )
    e = raises(p, root)
    assert (e.file, e.record, e.field) == (str(p), 2, "images")
    assert f"{p}:2 field 'images'" in str(e) and "cannot decode" in str(e) and "truncated" in str(e)
    assert skip_ids(p, root) == (["r1", "r3"], 1)
    # the single-path form names its own field, and check_images=false leaves it to the collator
    one = {k: v for k, v in good(1, image=f"images/cut{suffix}").items() if k != "images"}
    p = write_lines(root / "one.jsonl", [one])
    assert raises(p, root).field == "image"
    assert len(mau_jsonl.read(p, root=root, check_images=False)) == 1


def test_truncated_rejected_image_and_llava_image(root):
    full = _noise(root / "images" / "ok.jpg", "JPEG")
    (root / "images" / "cut.jpg").write_bytes(full[: len(full) - 40])
    p = write_lines(root / "pref.jsonl", [good(1, rejected={"answer": "No.", "images": ["images/cut.jpg"]})])
    assert raises(p, root).field == "rejected.images"
    recs = [
        {
            "id": i,
            "image": img,
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}],
        }
        for i, img in enumerate(["images/ok.jpg", "images/cut.jpg", "images/a.png"])
    ]
    (root / "llava.json").write_text(json.dumps(recs))
    with pytest.raises(RecordError, match="cannot decode") as e:
        llava.read(root / "llava.json", root=root)
    assert (e.value.record, e.value.field) == (1, "image") and "record [1] field 'image'" in str(e.value)
    assert [s.id for s in llava.read(root / "llava.json", root=root, on_bad_record="skip")] == ["0", "2"]


def test_truncated_image_bytes_in_a_table(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    full = _noise(tmp_path / "x.jpg", "JPEG")  # PIL's verify() (the old check) passes a truncated JPEG
    path = tmp_path / "t.parquet"
    pq.write_table(
        pa.table({"image": [full, full[: len(full) // 2]], "question": ["a?", "b?"], "answer": ["yes", "no"]}), path
    )
    with pytest.raises(RecordError, match="cannot decode") as e:
        vqa_table.read(path, image_cache=tmp_path / "c")
    assert (e.value.record, e.value.field) == (1, "image")
    assert len(vqa_table.read(path, image_cache=tmp_path / "c", on_bad_record="skip")) == 1


def test_truncated_dicom_and_nifti_are_record_errors(tmp_path):
    pytest.importorskip("pydicom")
    from nibabel.testing import data_path
    from pydicom.data import get_testdata_file

    ct = Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(ct[: len(ct) - 4000])
    vol = (Path(data_path) / "example4d.nii.gz").read_bytes()
    # cut before the slice the loader reads (only that slice is read, at check time as in training)
    (tmp_path / "cut.nii.gz").write_bytes(vol[: len(vol) // 10])
    for name in ("cut.dcm", "cut.nii.gz"):
        with pytest.raises(OSError, match=name):  # the loader names the file
            load_image(tmp_path / name)
        with pytest.raises(RecordError, match="cannot decode") as e:
            image_size(tmp_path / name, "records.jsonl", 7, "image")
        assert (e.value.file, e.value.record, e.value.field) == ("records.jsonl", 7, "image")


def test_a_shared_image_is_decoded_once(root, monkeypatch):
    from unveil.data import images

    images._checked_size.cache_clear()
    calls = []
    real = images.decode_fully
    monkeypatch.setattr(images, "decode_fully", lambda im: calls.append(1) or real(im))
    p = write_lines(root / "data.jsonl", [good(i) for i in range(5)])
    assert len(mau_jsonl.read(p, root=root)) == 5 and len(calls) == 1
    os.utime(root / "images" / "a.png", ns=(0, 0))  # a new version of the file is decoded again
    mau_jsonl.read(p, root=root)
    assert len(calls) == 2


# ------------------------------------------------------------------------------------------
# 3. encoding: bytes that are not UTF-8, and the BOM
# ------------------------------------------------------------------------------------------
def _latin1(rec: dict) -> bytes:
    """A record whose query holds a Latin-1 'é' (0xe9): not UTF-8."""
    return json.dumps(rec, ensure_ascii=False).encode("latin-1")


def test_jsonl_line_not_utf8_is_a_record_error_for_that_line_only(root):
    p = write_lines(root / "data.jsonl", [good(1), _latin1(good(2, query="Opacité?")), good(3)])
    e = raises(p, root)
    assert (e.file, e.record, e.field) == (str(p), 2, "query")
    assert f"{p}:2 field 'query'" in str(e) and "not valid UTF-8 at byte" in str(e) and "0xe9" in str(e)
    col = _latin1(good(2, query="Opacité?")).index(b"\xe9") + 1
    assert f"byte {col} of the line" in str(e)
    assert skip_ids(p, root) == (["r1", "r3"], 1)
    # a bad byte outside any string: the line cannot be parsed, still one line lost
    p = write_lines(root / "b.jsonl", [good(1), b'{"id": "r2",\xff "query": "q"}', good(3)])
    e = raises(p, root)
    assert (e.record, e.field) == (2, None) and "not valid UTF-8 at byte 13" in str(e)
    assert skip_ids(p, root) == (["r1", "r3"], 1)


def test_utf8_bom_is_not_a_bad_record(root):
    bom = b"\xef\xbb\xbf"
    p = write_lines(root / "data.jsonl", [bom + json.dumps(good(1)).encode(), good(2)])
    assert [s.id for s in mau_jsonl.read(p, root=root)] == ["r1", "r2"]
    assert skip_ids(p, root) == (["r1", "r2"], 0)
    # two files concatenated: the second one's BOM lands mid-file
    p = write_lines(root / "cat.jsonl", [bom + json.dumps(good(1)).encode(), bom + json.dumps(good(2)).encode()])
    assert skip_ids(p, root) == (["r1", "r2"], 0)
    # a JSON array with a BOM
    recs = [
        {
            "id": i,
            "image": "images/a.png",
            "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}],
        }
        for i in range(2)
    ]
    (root / "d.json").write_bytes(bom + json.dumps(recs).encode())
    assert [s.id for s in llava.read(root / "d.json", root=root)] == ["0", "1"]


def test_json_array_not_utf8_names_record_line_and_field(root):
    recs = [
        {
            "id": i,
            "image": "images/a.png",
            "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": a}],
        }
        for i, a in enumerate(["fine", "Opacité", "fine too", "encore é"])
    ]
    text = json.dumps(recs, indent=1, ensure_ascii=False)
    (root / "d.json").write_bytes(text.encode("latin-1"))
    line = text[: text.index("Opacit")].count("\n") + 1
    with pytest.raises(RecordError) as e:
        llava.read(root / "d.json", root=root)
    assert (e.value.record, e.value.field) == (1, "conversations[1].value")
    assert f"record [1] field 'conversations[1].value': line {line}: not valid UTF-8" in str(e.value)
    got = llava.read(root / "d.json", root=root, on_bad_record="skip")
    assert [s.id for s in got] == ["0", "2"] and got.skipped == 2


def test_csv_bom_and_bytes_not_utf8(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    rows = ["image,question,answer", "x.png,is it?,yes", "x.png,opacit\xe9?,no", "x.png,where?,left"]
    (tmp_path / "t.csv").write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode("latin-1") + b"\n")
    with pytest.raises(RecordError) as e:
        vqa_table.read(tmp_path / "t.csv")
    assert (e.value.record, e.value.field) == (3, "question") and "not valid UTF-8 (byte 0xe9)" in str(e.value)
    got = vqa_table.read(tmp_path / "t.csv", on_bad_record="skip")
    assert [s.target for s in got] == ["yes", "left"] and got.skipped == 1


# ------------------------------------------------------------------------------------------
# 4. fields that were accepted without a word
# ------------------------------------------------------------------------------------------
FIELD_CASES = {
    "task as a list": (dict(task=["localize"]), "task"),
    "empty task": (dict(task=" "), "task"),
    "short_answer as a dict": (dict(short_answer={"text": "yes"}), "short_answer"),
    "id true": (dict(id=True), "id"),
    "answer box off the grid": (dict(answer="Region [10, 20, 130, 40]: nodule."), "answer"),
    "answer box x1 >= x2": (dict(answer="Region [30, 20, 30, 40]: nodule."), "answer"),
    "answer box y1 > y2": (dict(answer="Region [10, 60, 30, 40]: nodule."), "answer"),
    "answer box negative": (dict(answer="Region [-5, 20, 30, 40]: nodule."), "answer"),
    "<image> in the answer": (dict(answer="<image> shows a nodule."), "answer"),
    "<image> in the rejected answer": (dict(rejected={"answer": "see <image>", "images": None}), "rejected.answer"),
    "rejected box off the grid": (dict(rejected={"answer": "[0, 0, 101, 50]", "images": None}), "rejected.answer"),
}


@pytest.mark.parametrize("kind", list(FIELD_CASES))
def test_field_kind_raise_names_file_line_field_and_skip_keeps_the_good_records(root, kind):
    change, field = FIELD_CASES[kind]
    bad = good(2, **change)
    p = write_lines(root / "data.jsonl", [good(1), bad, good(3)])
    e = raises(p, root)
    assert (e.file, e.record, e.field) == (str(p), 2, field), str(e)
    assert f"{p}:2 field '{field}'" in str(e)
    assert skip_ids(p, root) == (["r1", "r3"], 1)


def test_fields_that_stay_accepted(root):
    p = write_lines(
        root / "data.jsonl",
        [
            good(1, id=7, task="my_task", short_answer=None),  # int ids, own task names
            good(2, answer="Two regions [0, 0, 100, 100] and [12.5, 30, 25, 44.5].", short_answer="yes"),
            good(3, answer="No boxes, just [brackets] and [1, 2]."),
        ],
    )
    got = mau_jsonl.read(p, root=root)
    assert [s.id for s in got] == ["7", "r2", "r3"] and got[0].task == "my_task" and got[1].answer == "yes"


def test_image_placeholder_in_an_answer_of_the_other_formats(root):
    turns = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "It is <image>."}]
    recs = [{"id": 0, "image": "images/a.png", "conversations": turns}]
    (root / "l.json").write_text(json.dumps(recs))
    with pytest.raises(RecordError) as e:
        llava.read(root / "l.json", root=root)
    assert (e.value.record, e.value.field) == (0, "conversations[1].value")
    (root / "t.jsonl").write_text(json.dumps({"image": "images/a.png", "question": "Q?", "answer": "<image>"}) + "\n")
    with pytest.raises(RecordError) as e:
        vqa_table.read(root / "t.jsonl", root=root)
    assert (e.value.record, e.value.field) == (1, "answer")


def test_validate_sample_refuses_a_placeholder_in_an_assistant_turn():
    from unveil.data.schema import Rejected, Sample, validate_sample

    s = Sample(id="x", messages=[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<image>"}])
    assert [f for f, _ in validate_sample(s)] == ["messages"]
    s.messages[1]["content"] = "A"
    s.rejected = Rejected(messages=[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<image>"}])
    assert [f for f, _ in validate_sample(s)] == ["rejected"]


def test_duplicate_id_in_a_file(root):
    p = write_lines(root / "data.jsonl", [good(1), good(2), good(3, id="r1"), good(4, id=2), good(5, id="2")])
    e = raises(p, root)
    assert (e.file, e.record, e.field) == (str(p), 3, "id")
    assert f"{p}:3 field 'id': 'r1' is a duplicate of line 1" in str(e)
    assert skip_ids(p, root) == (["r1", "r2", "2"], 2)  # int 2 and "2" are one id
    # a bad record does not claim its id: the next good record with it is kept
    p = write_lines(root / "b.jsonl", [good(1, images=["images/missing.png"]), good(2, id="r1")])
    assert skip_ids(p, root) == (["r1"], 1)


def test_released_formats_keep_making_repeated_ids_unique(root):
    turns = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]
    recs = [{"id": "fig1", "image": "images/a.png", "conversations": turns}] * 2
    (root / "l.json").write_text(json.dumps(recs))
    assert [s.id for s in llava.read(root / "l.json", root=root)] == ["fig1", "fig1#2"]


# ------------------------------------------------------------------------------------------
# long records: data.max_tokens
# ------------------------------------------------------------------------------------------
def test_record_longer_than_max_tokens_names_its_longest_field(root):
    from unveil.data.adapters.base import CHARS_PER_TOKEN

    cap = 16 * CHARS_PER_TOKEN  # max_tokens=16
    p = write_lines(
        root / "data.jsonl",
        [good(1), good(2, query="q" * cap), good(3, answer="a" * (cap // 2)), good(4, rejected={"answer": "b" * cap})],
    )
    e = raises(p, root, max_tokens=16)
    assert (e.file, e.record, e.field) == (str(p), 2, "query") and "data.max_tokens=16" in str(e)
    assert skip_ids(p, root, max_tokens=16) == (["r1", "r3"], 2)
    assert len(mau_jsonl.read(p, root=root)) == 4  # no limit by default at this level
    with pytest.raises(ValueError, match="max_tokens"):
        mau_jsonl.read(p, root=root, max_tokens=0)


def test_long_llava_turn_is_named(root):
    turns = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A" * 100}]
    recs = [{"id": 0, "image": "images/a.png", "conversations": turns}]
    (root / "l.json").write_text(json.dumps(recs))
    with pytest.raises(RecordError) as e:
        llava.read(root / "l.json", root=root, max_tokens=4)
    assert (e.value.record, e.value.field) == (0, "conversations[1].value")
