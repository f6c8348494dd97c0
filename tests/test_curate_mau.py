"""builder=mau: MAU records from segmentation / detection sources (UMed-LVLM's data construction).

Every source is made in the test (NIfTI volumes with nibabel, a 2D mask folder, a box CSV, a
DICOM SEG with pydicom over pydicom's own CT test file); the visual-prompt path talks to a canned
OpenAI-compatible server on 127.0.0.1 and nothing else.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from chat_server import ChatServer, chat, local_only
from PIL import Image

import unveil.utils.resolvers  # noqa: F401
from unveil.curate.mau import PALETTE, parse_reply, split_patients
from unveil.curate.mau_sources import Region
from unveil.data.adapters import mau_jsonl
from unveil.data.boxes import iou_matrix

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-unveil-mau-test-0123456789"
ENV = "UNVEIL_TEST_MAU_KEY"
SPLITS = ("train", "val", "test")


def run_mau(out: Path, sources: list[dict], *overrides: str, **builder) -> dict:
    """Compose conf/curate.yaml with builder=mau as the CLI would, set the sources, run it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from unveil.curate.__main__ import curate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("curate", overrides=["builder=mau", f"out_dir={out}", "progress=false", *overrides])
    with open_dict(cfg):
        cfg.builder.sources = OmegaConf.create(sources)
        for k, v in builder.items():
            OmegaConf.update(cfg, f"builder.{k}", v, merge=False)
    return curate(cfg)


def read_all(out: Path) -> dict:
    """{split: [Sample]} of the builder's output, read back by the MAU adapter (images checked)."""
    return {s: mau_jsonl.read(out / f"{s}.jsonl", root=out) for s in SPLITS if (out / f"{s}.jsonl").exists()}


def loc_records(out: Path) -> dict:
    return {s.id.removesuffix("-loc"): s for ss in read_all(out).values() for s in ss if s.id.endswith("-loc")}


def assert_same_boxes(got, expected):
    assert len(got) == len(expected), (got, expected)
    if expected:
        iou = iou_matrix(np.array(got, float), np.array(expected, float))
        assert np.allclose(np.diag(iou), 1.0), (got, expected)


# --- sources made in the test -------------------------------------------------------------------
def block_box(r0, r1, c0, c1, h, w):
    """The normalised pixel-edge box of rows r0..r1-1, cols c0..c1-1."""
    return [c0 / w, r0 / h, c1 / w, r1 / h]


def make_volumes(root: Path, n: int = 6) -> dict:
    """n image + label volumes (identity affine); lesions in slices 3 and 7; returns the lesion blocks.

    Lesions are brighter in the image, so a written slice can be checked against the label."""
    import nibabel as nib

    (root / "img").mkdir(parents=True)
    (root / "lab").mkdir()
    blocks = {}
    rng = np.random.default_rng(0)
    for v in range(n):
        img = 100 + rng.normal(0, 5, (24, 20, 10))
        lab = np.zeros((24, 20, 10), np.int16)
        # (slice, label, i0, i1, j0, j1) in array axes (i: x, j: y)
        les = [(3, 1, 2 + v % 3, 9, 3, 8), (3, 2, 14, 20, 10, 16), (7, 1, 5, 12, 6, 13)]
        for z, k, i0, i1, j0, j1 in les:
            lab[i0:i1, j0:j1, z] = k
            img[i0:i1, j0:j1, z] += 80
        nib.save(nib.Nifti1Image(img.astype(np.float32), np.eye(4)), root / "img" / f"pat{v}_t1.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), root / "lab" / f"pat{v}_seg.nii.gz")
        blocks[f"pat{v}"] = les
    return blocks


def nifti_source(root: Path, **kw) -> dict:
    return {
        "kind": "nifti",
        "images": str(root / "img"),
        "labels": str(root / "lab"),
        "image_suffix": "_t1",
        "label_suffix": "_seg",
        "min_area": 10,
        "min_gap": 2,
        "normal_per_volume": 1,
        **kw,
    }


# rows r0..r1-1, cols c0..c1-1 on a 30 x 40 image (h x w); label
MASK_BLOCKS = {
    "case0": [(4, 10, 3, 9, 1), (18, 25, 30, 37, 1), (20, 22, 15, 17, 1)],  # the 2x2 one is under min size
    "case1": [],
    "case2": [(8, 16, 20, 29, 2)],
    "case3": [(2, 7, 25, 33, 2), (12, 20, 5, 14, 1)],
}
H, W = 30, 40


def make_mask_folder(root: Path, patients: dict | None = None) -> None:
    """images/<name>.png (grey noise) and masks/<name>_mask.png (label ids) for MASK_BLOCKS."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(1)
    for name, blocks in (patients or MASK_BLOCKS).items():
        img = rng.integers(40, 120, (H, W)).astype(np.uint8)
        mask = np.zeros((H, W), np.uint8)
        for r0, r1, c0, c1, k in blocks:
            mask[r0:r1, c0:c1] = k
            img[r0:r1, c0:c1] = 200
        Image.fromarray(img).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}_mask.png")


def mask_source(root: Path, **kw) -> dict:
    return {
        "kind": "masks",
        "images": str(root / "images"),
        "masks": str(root / "masks"),
        "mask_suffix": "_mask",
        **kw,
    }


def expected_mask_boxes(name: str, min_px: int = 5) -> list[list[float]]:
    big = [b for b in MASK_BLOCKS[name] if (b[1] - b[0]) * (b[3] - b[2]) >= min_px]
    return sorted((block_box(r0, r1, c0, c1, H, W) for r0, r1, c0, c1, _ in big), key=lambda b: (b[0], b[1]))


LABELS = {1: "lesion", 2: "cyst"}
MASK_SPLIT = {"train": 0.5, "val": 0.25, "test": 0.25}


# --- sources -> records -------------------------------------------------------------------------
def test_nifti_volumes_become_one_record_set_per_chosen_slice(tmp_path):
    from unveil.data.medical import nifti_slice

    blocks = make_volumes(tmp_path / "vol")
    out = tmp_path / "out"
    summary = run_mau(out, [nifti_source(tmp_path / "vol")], label_names=LABELS, modality="mri", normal_ratio=0.5)
    recs = loc_records(out)
    abnormal = {k: s for k, s in recs.items() if s.boxes}
    assert sorted(abnormal) == sorted(f"pat{v}_a{z:04d}" for v in range(6) for z in (3, 7))
    for sid, s in abnormal.items():
        pid, z = sid.split("_a")[0], int(sid.split("_a")[1])
        lab = nifti_slice(tmp_path / "vol" / "lab" / f"{pid}_seg.nii.gz", axis=2, index=z)  # the loader's view
        h, w = lab.shape
        expected = []
        for k in (1, 2):
            ys, xs = np.nonzero(lab == k)
            if len(ys):  # one block per label per slice: its bounding box is the component's
                expected.append([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h])
        expected.sort(key=lambda b: (b[0], b[1]))
        assert_same_boxes(s.boxes, expected)
        assert len(expected) == sum(1 for b in blocks[pid] if b[0] == z)
        assert s.findings == [LABELS[int(lab[int(b[1] * h), int(b[0] * w)])] for b in expected]
        # the written slice is the image slice the label describes: the lesions are its bright pixels
        png = np.asarray(Image.open(s.images[0]).convert("L"), float)
        inside = np.zeros_like(png, bool)
        inside[lab > 0] = True
        assert png.shape == lab.shape and png[inside].mean() > png[~inside].mean() + 60
        assert s.meta["source_slice"] == {"axis": 2, "index": z} and s.meta["modality"] == "mri"
        assert s.target.startswith("Abnormality detected. Region [") and s.meta["answer_source"] == "template"
    normals = [s for s in recs.values() if not s.boxes]
    assert len(normals) == 6 and all(s.target == "No abnormality detected. The study appears normal." for s in normals)
    assert {s.meta["source_slice"]["index"] for s in normals}.isdisjoint({3, 7})
    info = json.loads((out / "inputs.json").read_text())
    assert info["studies_abnormal"] == 12 and info["studies_normal"] == 6
    assert sum(summary["splits"][s]["written"] for s in SPLITS) == sum(len(v) for v in read_all(out).values())


def test_mask_folder_and_box_table_give_the_component_boxes(tmp_path):
    make_mask_folder(tmp_path / "m")
    out = tmp_path / "out"
    run_mau(
        out, [mask_source(tmp_path / "m")], label_names=LABELS, min_component_px=5, normal_ratio=1.0, split=MASK_SPLIT
    )
    recs = loc_records(out)
    assert sorted(recs) == ["case0", "case1", "case2", "case3"]  # case1 is the normal one
    for name in MASK_BLOCKS:
        assert_same_boxes(recs[name].boxes, expected_mask_boxes(name))
    assert recs["case3"].findings == ["lesion", "cyst"]  # reading order: left to right
    # the same areas as a box table (pixel edges) -> the same boxes
    rows = ["image,x1,y1,x2,y2,label"]
    for name, blocks in MASK_BLOCKS.items():
        big = [b for b in blocks if (b[1] - b[0]) * (b[3] - b[2]) >= 5]
        rows += [f"{name}.png,{c0},{r0},{c1},{r1},{LABELS[k]}" for r0, r1, c0, c1, k in big] or [f"{name}.png,,,,,"]
    (tmp_path / "boxes.csv").write_text("\n".join(rows) + "\n")
    out2 = tmp_path / "out_boxes"
    table = {"kind": "boxes", "table": str(tmp_path / "boxes.csv"), "images": str(tmp_path / "m" / "images")}
    run_mau(out2, [table], normal_ratio=1.0, split=MASK_SPLIT)
    recs2 = loc_records(out2)
    for name in MASK_BLOCKS:
        assert_same_boxes(recs2[name].boxes, expected_mask_boxes(name))
        assert recs2[name].findings == recs[name].findings and recs2[name].target == recs[name].target
    # closed and open questions come from the same labels
    by_id = {s.id: s for ss in read_all(out).values() for s in ss}
    assert by_id["case2-presence"].answer == "yes" and by_id["case1-presence"].answer == "no"
    assert by_id["case2-type"].answer == "cyst" and "case3-type" not in by_id  # two findings: no single type
    assert by_id["case3-open"].target == "Lesion, cyst." and by_id["case3-open"].task == "vqa_open"


def test_dicom_seg_frames_become_boxes(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.pixels import pack_bits
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    (tmp_path / "series").mkdir()
    ct.save_as(tmp_path / "series" / "ct1.dcm")
    mask = np.zeros((1, ct.Rows, ct.Columns), np.uint8)
    mask[0, 40:60, 30:45] = 1
    seg = Dataset()
    seg.file_meta = FileMetaDataset()
    seg.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    seg.SOPClassUID = seg.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    seg.SOPInstanceUID = seg.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    seg.Modality, seg.PatientID, seg.SegmentationType = "SEG", "PT-7", "BINARY"
    seg.Rows, seg.Columns, seg.NumberOfFrames = ct.Rows, ct.Columns, 1
    seg.SamplesPerPixel, seg.PhotometricInterpretation = 1, "MONOCHROME2"
    seg.BitsAllocated, seg.BitsStored, seg.HighBit, seg.PixelRepresentation = 1, 1, 0, 0
    seg.SegmentSequence = Sequence([Dataset()])
    seg.SegmentSequence[0].SegmentNumber, seg.SegmentSequence[0].SegmentLabel = 1, "liver lesion"
    ref = Dataset()
    ref.ReferencedSOPInstanceUID = ct.SOPInstanceUID
    der = Dataset()
    der.SourceImageSequence = Sequence([ref])
    ident = Dataset()
    ident.ReferencedSegmentNumber = 1
    frame = Dataset()
    frame.DerivationImageSequence = Sequence([der])
    frame.SegmentIdentificationSequence = Sequence([ident])
    seg.PerFrameFunctionalGroupsSequence = Sequence([frame])
    seg.PixelData = pack_bits(mask)
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    src = {"kind": "dicom_seg", "seg": str(tmp_path / "seg.dcm"), "images": str(tmp_path / "series"), "min_area": 1}
    run_mau(out, [src], modality="ct", split={"train": 1.0})
    (s,) = [x for x in read_all(out)["train"] if x.id.endswith("-loc")]
    assert_same_boxes(s.boxes, [block_box(40, 60, 30, 45, ct.Rows, ct.Columns)])
    assert s.findings == ["liver lesion"] and s.meta["patient_id"] == "PT-7" and s.images[0].endswith(".dcm")


# --- the visual prompt against a local endpoint ---------------------------------------------------
class Canned:
    def __init__(self):
        self.requests: list[dict] = []
        self.policy = None  # body -> (status, reply text, delay s)


@pytest.fixture
def server(monkeypatch):
    local_only(monkeypatch)
    canned = Canned()

    def answer(body):
        status, text, delay = canned.policy(body)
        return status, chat(text) if status == 200 else {}, delay

    srv = ChatServer(answer)
    canned.requests, canned.url = srv.requests, srv.url
    yield canned
    srv.close()


def prompt_text(body: dict) -> str:
    return body["messages"][-1]["content"][0]["text"]


def radiologist(body: dict) -> tuple[int, str, float]:
    """A stand-in GPT-4V: names each listed area by its tag and finding."""
    areas = re.findall(r"<area(\d+)> \(\w+\): ([\w ]+)", prompt_text(body))
    if not areas:
        return 200, "No abnormality detected. The study appears normal; the field is clear.", 0.0
    parts = [f"<area{k}>: {name}, a well-defined bright focus." for k, name in areas]
    return 200, "Abnormality detected. " + " ".join(parts), 0.0


def endpoint(server, **kw) -> dict:
    return {"model": "vision-1", "base_url": server.url, "api_key_env": ENV, "timeout": 5, "backoff": 0.01, **kw}


TEMPLATE = "MARKER-7 Diagnose this {modality} image. Areas:\n{areas}"


def test_request_carries_the_marked_image_and_template_and_the_reply_is_the_answer(server, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    server.policy = radiologist
    make_mask_folder(tmp_path / "m")
    out = tmp_path / "out"
    src = mask_source(tmp_path / "m")
    run_mau(out, [src], label_names=LABELS, min_component_px=5, normal_ratio=1.0, split=MASK_SPLIT,
            modality="ct", endpoint=endpoint(server, retries=0), prompt=TEMPLATE, max_workers=1)  # fmt: skip
    assert len(server.requests) == 4
    for req in server.requests:
        body = req["body"]
        assert req["headers"]["Authorization"] == f"Bearer {KEY}" and body["model"] == "vision-1"
        assert KEY not in json.dumps(body)
    (case2,) = [
        r["body"]
        for r in server.requests
        if "cyst" in prompt_text(r["body"]) and "lesion" not in prompt_text(r["body"])
    ]
    assert prompt_text(case2) == TEMPLATE.format(modality="CT", areas="<area1> (red): cyst")
    url = case2["messages"][-1]["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
    orig = np.asarray(Image.open(tmp_path / "m" / "images" / "case2.png").convert("RGB"))
    red = PALETTE[0][1]  # vocabulary order: cyst (red), lesion (green)
    r0, r1, c0, c1, _ = MASK_BLOCKS["case2"][0]
    assert tuple(sent[r0, c0 + 4]) == red and tuple(sent[r1 - 1, c0 + 4]) == red  # the outline is drawn
    assert tuple(sent[(r0 + r1) // 2, (c0 + c1) // 2]) == tuple(orig[(r0 + r1) // 2, (c0 + c1) // 2])  # inside kept
    assert np.array_equal(sent[:, :10], orig[:, :10])  # far from the area: the image as it was
    recs = loc_records(out)
    box = "[{}, {}, {}, {}]".format(*(round(v * 100) for v in expected_mask_boxes("case2")[0]))
    assert recs["case2"].target == f"Abnormality detected. {box}: cyst, a well-defined bright focus."
    assert recs["case2"].meta["answer_source"] == "endpoint"
    assert recs["case1"].target.startswith("No abnormality detected.")
    assert_same_boxes(recs["case3"].boxes, expected_mask_boxes("case3"))
    assert all(KEY not in p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())


def test_server_errors_and_timeouts_skip_and_count_the_study(server, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    make_mask_folder(tmp_path / "m")

    def flaky(body):
        text = prompt_text(body)
        if "cyst" in text and "lesion" not in text:  # case2
            return 500, "", 0.0
        if "cyst" in text:  # case3
            return 200, "late", 1.0
        return radiologist(body)

    server.policy = flaky
    out = tmp_path / "out"
    summary = run_mau(out, [mask_source(tmp_path / "m")], label_names=LABELS, min_component_px=5, normal_ratio=1.0,
                      split=MASK_SPLIT, endpoint=endpoint(server, retries=1, timeout=0.3))  # fmt: skip
    skipped = {
        k: sum(c.get(k, 0) for c in summary["splits"].values())
        for k in ("skipped/request_http_500", "skipped/request_timeout")
    }
    assert skipped == {"skipped/request_http_500": 1, "skipped/request_timeout": 1}
    ids = {s.id for ss in read_all(out).values() for s in ss}
    assert not any(i.startswith(("case2-", "case3-")) for i in ids)  # no record of a failed study, none half-written
    assert {"case0-loc", "case0-presence", "case1-loc"} <= ids
    fails = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted((f["study_id"], f["reason"]) for f in fails) == [
        ("case2", "request_http_500"),
        ("case3", "request_timeout"),
    ]
    assert len(server.requests) == 2 + 2 + 2  # case0, case1 once; case2 and case3 tried twice (one retry)


def test_a_rerun_sends_no_request_for_cached_studies_and_the_budget_stops_requests(server, tmp_path):
    server.policy = radiologist
    make_mask_folder(tmp_path / "m")
    src = [mask_source(tmp_path / "m")]
    kw = dict(label_names=LABELS, min_component_px=5, normal_ratio=1.0, split=MASK_SPLIT, endpoint=endpoint(server))
    out = tmp_path / "out"
    first = run_mau(out, src, **kw, max_requests=2)
    assert len(server.requests) == 2
    assert sum(c.get("skipped/budget_exhausted", 0) for c in first["splits"].values()) == 2
    run_mau(out, src, **kw)  # the two answered studies come from the cache: two new requests
    assert len(server.requests) == 4
    before = {s: (out / f"{s}.jsonl").read_text() for s in SPLITS}
    again = run_mau(out, src, **kw)
    assert len(server.requests) == 4  # all four cached: nothing sent
    assert sum(c.get("cache_hits", 0) for c in again["splits"].values()) == 4
    assert {s: (out / f"{s}.jsonl").read_text() for s in SPLITS} == before
    assert all(s.meta["answer_source"] == "endpoint" for s in loc_records(out).values())


def test_no_patient_is_in_two_splits(tmp_path):
    patients = {f"P{p}_img{k}": MASK_BLOCKS["case2" if k else "case1"] for p in range(7) for k in range(3)}
    make_mask_folder(tmp_path / "m", patients)
    out = tmp_path / "out"
    run_mau(out, [mask_source(tmp_path / "m", patient_regex=r"^(P\d+)_")], label_names=LABELS, normal_ratio=0.5)
    seen: dict[str, set] = {}
    for split, samples in read_all(out).items():
        for s in samples:
            assert s.meta["patient_id"] == s.id.split("_")[0]
            seen.setdefault(s.meta["patient_id"], set()).add(split)
    assert len(seen) == 7 and all(len(v) == 1 for v in seen.values())
    assert {v for vs in seen.values() for v in vs} == set(SPLITS)
    got = split_patients([f"x{i}" for i in range(20)], {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
    assert sorted(Counter_of(got.values()).items()) == [("test", 2), ("train", 16), ("val", 2)]


def Counter_of(values):  # noqa: N802
    from collections import Counter

    return Counter(values)


def test_reply_parsing_refuses_what_would_break_the_record():
    regions = [Region(1, "lesion", (0.1, 0.2, 0.3, 0.4)), Region(2, "cyst", (0.5, 0.5, 0.7, 0.9))]
    vocab = ["cyst", "lesion"]
    ok, why = parse_reply("Abnormal. <area1>: lesion here. <Area 2>: cyst there; <area1> again.", regions, vocab)
    assert (
        why is None
        and ok == "Abnormal. [10, 20, 30, 40]: lesion here. [50, 50, 70, 90]: cyst there; that region again."
    )
    assert parse_reply("<area2>: cyst. <area1>: lesion.", regions, vocab) == (None, "out_of_order")
    assert parse_reply("<area1>: lesion.", regions, vocab) == (None, "missing_area")
    assert parse_reply("<area1>: lesion.", regions, vocab, missing_areas="append")[0].endswith(
        "Region [50, 50, 70, 90]: cyst."
    )
    assert parse_reply("<area1>: lesion [1, 2, 3, 4]. <area2>: cyst.", regions, vocab) == (None, "own_coordinates")
    assert parse_reply("<area1>: lesion. <area3>: cyst.", regions, vocab) == (None, "unknown_area")
    assert parse_reply("<area1>: cyst. <area2>: lesion.", regions, vocab) == (None, "labels_mismatch")
    assert parse_reply("A large lesion is present.", [], vocab) == (None, "says_abnormal")
    assert parse_reply("No abnormality detected.", [], vocab) == ("No abnormality detected.", None)


# --- the output trains ------------------------------------------------------------------------------
def test_template_only_output_of_the_volumes_trains(tmp_path):
    from hydra import compose, initialize_config_dir

    from unveil.train import train

    make_volumes(tmp_path / "vol")
    out = tmp_path / "out"
    globs = {
        "images": str(tmp_path / "vol" / "img" / "*_t1.nii.gz"),
        "labels": str(tmp_path / "vol" / "lab" / "*.nii.gz"),
    }
    run_mau(out, [nifti_source(tmp_path / "vol", **globs)], label_names=LABELS, modality="mri", normal_ratio=0.5)
    assert len(loc_records(out)) == 18  # 6 volumes x (2 lesion slices + 1 normal): the globs paired them all
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "debug=fast",
                "data=mau_jsonl",
                f"data.root={out}",
                "data.num_workers=0",
                "model.vision_pretrain.steps=1",
                "trainer.max_steps=2",
                "trainer.val_check_interval=2",
                "+trainer.enable_progress_bar=false",
                "eval.max_new_tokens=8",
                "logger=none",
                "~callbacks",
                "+trainer.enable_checkpointing=false",
                f"paths.output_dir={tmp_path / 'run'}",
                f"paths.cache_dir={tmp_path / 'cache'}",
            ],
        )
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and "test/iou" in metrics
