"""The native JSONL adapter: clear errors naming file, line and field; skip-and-count policy."""

import json

import pytest
from PIL import Image

from unveil.data.adapters import mau_jsonl
from unveil.data.errors import RecordError


@pytest.fixture
def root(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (200, 100), "gray").save(tmp_path / "images" / "a.png")
    return tmp_path


def good(**kw):
    r = {
        "id": "r1",
        "images": ["images/a.png"],
        "query": "Where is it?",
        "answer": "Region [10, 20, 30, 40]: nodule.",
        "boxes": [[0.1, 0.2, 0.3, 0.4]],
        "findings": ["nodule"],
        "modality": "ct",
    }
    r.update(kw)
    return r


def write(root, *records, raw_lines=()):
    p = root / "data.jsonl"
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    p.write_text("\n".join(lines) + "\n")
    return p


def error_of(path, root):
    with pytest.raises(RecordError) as e:
        mau_jsonl.read(path, root=root)
    return e.value


def test_good_record(root):
    (s,) = mau_jsonl.read(write(root, good(box_units="pixel", boxes=[[20, 20, 60, 40]])), root=root)
    assert s.boxes == [[0.1, 0.2, 0.3, 0.4]]  # pixel boxes normalised by the 200x100 image
    assert s.messages[0]["content"] == "<image>\nWhere is it?"
    assert s.meta["modality"] == "ct" and s.task == "localize"


def test_malformed_line_names_file_and_line(root):
    p = write(root, good(), good(id="r2"), raw_lines=['{"id": "r3", "images": ['])
    e = error_of(p, root)
    assert e.file == str(p) and e.record == 3
    assert f"{p}:3" in str(e) and "malformed JSON" in str(e)


def test_missing_image_names_file_line_field_and_path(root):
    p = write(root, good(), good(id="r2", images=["images/missing.png"]))
    e = error_of(p, root)
    assert (e.record, e.field) == (2, "images")
    assert "missing.png" in str(e) and f"{p}:2 field 'images'" in str(e)


def test_unreadable_image(root):
    (root / "images" / "bad.png").write_bytes(b"not a png at all" * 10)
    e = error_of(write(root, good(images=["images/bad.png"])), root)
    assert (e.record, e.field) == (1, "images") and "unreadable" in str(e)


def test_box_outside_the_image(root):
    e = error_of(write(root, good(), good(id="r2", box_units="pixel", boxes=[[20, 20, 260, 40]])), root)
    assert (e.record, e.field) == (2, "boxes[0]") and "outside the 200x100 image" in str(e)
    e = error_of(write(root, good(boxes=[[0.1, 0.2, 1.3, 0.4]])), root)
    assert (e.record, e.field) == (1, "boxes[0]")


def test_other_field_errors(root):
    cases = [
        (good(answer=None), "answer"),
        ({k: v for k, v in good().items() if k != "query"}, "query"),
        (good(findings=["nodule", "cyst"]), "findings"),
        (good(box_units="percent"), "box_units"),
        (good(boxes=[[0.1, 0.2, "x", 0.4]]), "boxes[0]"),
        (good(images=["../../etc/passwd"]), "images"),
        (good(query="<image><image> two placeholders, one image"), "images"),
        (good(weight="heavy"), "weight"),
    ]
    for rec, field in cases:
        e = error_of(write(root, rec), root)
        assert e.field == field, (rec, str(e))
        assert str(root / "data.jsonl") in str(e) and ":1" in str(e)


def test_skip_policy_counts(root, caplog):
    p = write(root, good(), good(id="r2", images=["images/missing.png"]), raw_lines=["{oops"])
    samples = mau_jsonl.read(p, root=root, on_bad_record="skip")
    assert [s.id for s in samples] == ["r1"]
    assert samples.skipped == 2
    assert "skipped 2 bad record(s)" in caplog.text
    with pytest.raises(ValueError, match="on_bad_record"):
        mau_jsonl.read(p, root=root, on_bad_record="ignore")


def test_preference_fields(root):
    Image.new("RGB", (200, 100), "white").save(root / "images" / "noised.png")
    (s,) = mau_jsonl.read(
        write(
            root, good(rejected={"answer": "No abnormality detected.", "images": ["images/noised.png"]}, weight=0.4)
        ),
        root=root,
    )
    assert s.rejected.messages[-1]["content"] == "No abnormality detected."
    assert s.rejected.images[0].endswith("noised.png") and s.weight == 0.4


def test_an_adapter_target_that_names_nothing_fails_listing_the_data_configs():
    from unveil.utils.plug import locate

    with pytest.raises(ValueError, match=r"data.adapter._target_='unveil.data.adapters.nope.read'.*data=mau_jsonl"):
        locate("unveil.data.adapters.nope.read", "data.adapter", group="data")
