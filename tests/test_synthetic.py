import json

import numpy as np
from PIL import Image

from unveil.data.adapters import mau_jsonl
from unveil.data.synthetic import SyntheticConfig, generate


def _read(d):
    return {s: (d / f"{s}.jsonl").read_text() for s in ("train", "val", "test")}


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    a = generate(SyntheticConfig(n_patients=10, seed=1), tmp_path / "a", progress=False)
    b = generate(SyntheticConfig(n_patients=10, seed=1), tmp_path / "b", progress=False)
    c = generate(SyntheticConfig(n_patients=10, seed=2), tmp_path / "c", progress=False)
    assert _read(a) == _read(b)
    assert _read(a) != _read(c)
    for p in (a / "images").iterdir():
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(b / "images" / p.name)))


def test_content_meets_the_spec(tmp_path):
    d = generate(SyntheticConfig(n_patients=60, seed=0), tmp_path, progress=False)
    recs = [json.loads(l) for s in ("train", "val", "test") for l in open(d / f"{s}.jsonl")]
    loc = [r for r in recs if r["task"] == "localize"]
    assert len({r["modality"] for r in loc}) >= 3
    assert len({f for r in loc for f in r["findings"]}) >= 3
    normal = sum(1 for r in loc if not r["boxes"])
    assert normal / len(loc) >= 0.2
    assert any(len(r["boxes"]) > 1 for r in loc)  # 0..k lesions
    sizes = [(b[2] - b[0]) * (b[3] - b[1]) for r in loc for b in r["boxes"]]
    assert max(sizes) > 3 * min(sizes)  # varied size
    # every abnormal answer walks detect -> localise -> diagnose with its box in the text
    for r in loc:
        if r["boxes"]:
            assert r["answer"].startswith("Abnormality detected.") and "[" in r["answer"]
            assert all(f in r["answer"] for f in r["findings"])
    closed = {r["query"].split("?")[0] for r in recs if r["task"] == "vqa_closed"}
    assert any("type" in q for q in closed) and any("abnormal" in q for q in closed)


def test_splits_by_patient(tmp_path):
    d = generate(SyntheticConfig(n_patients=80, seed=0), tmp_path, progress=False)
    pats = {s: {json.loads(l)["patient_id"] for l in open(d / f"{s}.jsonl")} for s in ("train", "val", "test")}
    assert (
        not (pats["train"] & pats["test"]) and not (pats["train"] & pats["val"]) and not (pats["val"] & pats["test"])
    )
    assert all(pats.values())


def test_boxes_cover_the_drawn_lesion(tmp_path):
    """The ground-truth box must be where the image changed: compare against a lesion-free copy."""
    from unveil.data.synthetic import anatomy, generator

    cfg = SyntheticConfig(seed=5)
    for modality in anatomy.MODALITIES:
        rng = np.random.default_rng(7)
        bg, _ = anatomy.MODALITIES[modality](np.random.default_rng(7), cfg.image_size)
        img, boxes, _ = generator.render_study(cfg, rng, modality, 1)
        diff = np.abs(img.astype(float) / 255 - np.clip(bg, 0, 1)).reshape(cfg.image_size, cfg.image_size, -1).max(-1)
        ys, xs = np.nonzero(diff > 0.2)
        x1, y1, x2, y2 = np.array(boxes[0]) * cfg.image_size
        inside = (xs >= x1 - 1) & (xs <= x2 + 1) & (ys >= y1 - 1) & (ys <= y2 + 1)
        assert inside.mean() > 0.97, modality


def test_generated_set_reads_back_through_the_adapter(synthetic_dir):
    samples = mau_jsonl.read(synthetic_dir / "train.jsonl")
    assert samples and all(s.images and s.messages[0]["content"].startswith("<image>") for s in samples)
    assert all(0 <= v <= 1 for s in samples for b in s.boxes for v in b)


def test_refuses_to_overwrite_real_data(tmp_path):
    import pytest

    (tmp_path / "train.jsonl").write_text('{"id": "mine"}\n')
    with pytest.raises(FileExistsError, match="did not write"):
        generate(SyntheticConfig(n_patients=4), tmp_path, progress=False)
    assert (tmp_path / "train.jsonl").read_text() == '{"id": "mine"}\n'


def test_a_run_waits_for_a_set_another_run_is_writing(tmp_path):
    """A multirun may start several runs on one set that is not generated yet. One writes it (holding
    ``<set>.lock``); another must wait for it, not fail on its half-written files or rewrite them."""
    import threading

    from filelock import FileLock

    out = tmp_path / "shared"
    cfg = SyntheticConfig(n_patients=12, seed=4)
    writer = FileLock(str(out) + ".lock")
    writer.acquire()
    (out / "images").mkdir(parents=True)
    (out / "train.jsonl").write_text('{"id": "half-wri')  # the other run is mid-way through its files
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(path=generate(cfg, out, progress=False)), daemon=True)
    t.start()
    t.join(1.0)
    assert t.is_alive() and not result  # waiting, not raising on the foreign-looking JSONL
    (out / "train.jsonl").unlink()  # the writer finishes its set ...
    from unveil.data.synthetic.generator import _generate

    _generate(cfg, out, progress=False)
    writer.release()  # ... and lets go
    t.join(30)
    assert result["path"] == out
    info = json.loads((out / "info.json").read_text())
    assert len(mau_jsonl.read(out / "train.jsonl")) == info["records"]["train"] > 0
