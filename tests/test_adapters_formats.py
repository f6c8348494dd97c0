"""Format adapters for the released record shapes (docs/data_formats.md), quirks included.

Fixtures: ``tests/fixtures/formats/`` (written from the FORMATS.md descriptions; tiny images)
and the real MMedPO records copied into ``tests/fixtures/formats/mmedpo/``.
"""

from __future__ import annotations

import importlib
import io
import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from unveil.data.adapters import llava, med_mim, mmedpo, stllava_dpo, vqa_table
from unveil.data.errors import RecordError
from unveil.data.images import load_image
from unveil.data.schema import IMAGE_PLACEHOLDER, validate_sample

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "formats"
MMEDPO_FILES = (
    "slake_dpo_weighted.sample.json",
    "vqa-rad_dpo_weighted.sample.json",
    "iuxray_dpo_weighted.sample.json",
)
FORMATS = ("llava", "med_mim", "vqa_table", "mmedpo", "stllava_dpo")


def _shared(name: str) -> Path:
    p = FIX / "mmedpo" / name  # copies of the real released MMedPO records
    assert p.is_file(), f"real MMedPO sample {p} is missing"
    return p


def _png(path: Path, size=(6, 5), value=128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def _png_bytes(size=(7, 4), value=30) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _all_valid(samples):
    for s in samples:
        assert validate_sample(s) == [], (s.id, validate_sample(s))
        for p in s.images:
            assert Path(p).is_absolute()


# ==========================================================================================
# registry and configs
# ==========================================================================================
def read(fmt: str, *args, **kw):
    """The ``read`` of adapter module ``fmt`` (what ``data.adapter._target_`` names in its yaml)."""
    return importlib.import_module(f"unveil.data.adapters.{fmt}").read(*args, **kw)


def test_every_adapter_is_plugged_in_by_a_data_config():
    from unveil.utils.plug import locate

    for name in FORMATS:
        cfg = OmegaConf.load(REPO / "conf" / "data" / f"{name}.yaml")
        assert cfg._target_ == "unveil.data.records.RecordSet"
        assert cfg.adapter._target_ == f"unveil.data.adapters.{name}.read" and cfg.adapter._partial_
        assert (
            locate(cfg.adapter._target_, "data.adapter")
            is importlib.import_module(f"unveil.data.adapters.{name}").read
        )
        assert set(cfg.splits) == {"train", "val", "test"}
        assert cfg.splits.train


def test_the_datamodule_call_reads_each_format():
    """What RecordSet.load does per split (without importing Lightning: it is slow to load)."""
    calls = {
        "llava": "llava/instruct.json",
        "med_mim": "med_mim/MedMIM_Held_in_Temporal.json",
        "vqa_table": "vqa/pathvqa.csv",
        "mmedpo": "mmedpo/visual_pairs.json",
        "stllava_dpo": "stllava/dpo.json",
    }
    for fmt, rel in calls.items():
        samples = read(fmt, FIX / rel, root=FIX, on_bad_record="raise", check_images=True)
        assert samples and samples.skipped == 0, fmt
        _all_valid(samples)
    assert [s.meta["ability"] for s in med_mim.read(FIX / calls["med_mim"], root=FIX)] == ["temporal"] * 2


# ==========================================================================================
# MMedPO: the real released records
# ==========================================================================================
@pytest.mark.parametrize("name", MMEDPO_FILES)
def test_mmedpo_real_records_load(name):
    path = _shared(name)
    raw = json.loads(path.read_text(encoding="utf-8"))
    samples = mmedpo.read(path, check_images=False)
    assert len(samples) == len(raw) == 15
    _all_valid(samples)
    for s, r in zip(samples, raw):
        assert s.id == str(r["id"])
        assert s.images == [str((path.parent / r["image"]).resolve())]
        assert s.weight == r["weighted_score"] == s.meta["weighted_score"]
        assert s.messages[0] == {"role": "user", "content": r["conversations"][0]["value"]}
        assert s.messages[0]["content"].startswith(IMAGE_PLACEHOLDER + "\n")
        assert s.meta["raw_chosen"] == r["conversations"][1]["value"]
        assert s.meta["raw_rejected"] == r["rejected_conversations"][1]["value"]
        assert s.target == s.target.strip() and s.target
        assert s.rejected is not None and s.rejected.images is None
        assert s.rejected.messages[0] == s.messages[0]
        assert s.rejected.messages[1]["content"] == r["rejected_conversations"][1]["value"].strip()
        assert s.rejected.messages[1]["role"] == "assistant"
    assert len({s.id for s in samples}) == len(samples)


def test_mmedpo_quirks_ids_weights_whitespace_scaffolding():
    slake = mmedpo.read(_shared("slake_dpo_weighted.sample.json"), check_images=False)
    rad = mmedpo.read(_shared("vqa-rad_dpo_weighted.sample.json"), check_images=False)
    iu = mmedpo.read(_shared("iuxray_dpo_weighted.sample.json"), check_images=False)
    # int ids (SLAKE, VQA-RAD) and string ids (IU-Xray) both become strings; the int is kept
    assert slake[0].id == "0" and slake[0].meta["orig_id"] == 0
    assert iu[0].id == "CXR1000_IM-0003" and "orig_id" not in iu[0].meta
    # weight 0 is allowed and kept raw
    assert any(s.weight == 0.0 for s in slake + rad + iu)
    # leading space / newline stripped for training, raw kept
    s = next(s for s in iu if s.meta["raw_chosen"].startswith(" \n"))
    assert s.target.startswith("The chest X-ray") and s.meta["raw_chosen"] != s.target
    s = next(s for s in rad if s.meta["raw_chosen"].startswith("\n"))
    assert s.target == s.answer == "X-ray \u2013 plain film" and s.meta["raw_chosen"] == "\n X-ray \u2013 plain film"
    # leaked generation scaffolding: the answer after it, flagged
    leaked = {s.id: s for s in slake + rad if s.meta.get("scaffolding")}
    assert {x.target for x in leaked.values()} == {"X-Ray", "Right Lung", "cecum"}
    assert all(x.meta["raw_chosen"].startswith("Question:") for x in leaked.values())
    kept = mmedpo.read(_shared("slake_dpo_weighted.sample.json"), check_images=False, clean_scaffolding=False)
    assert any(x.target.startswith("Question:") for x in kept)
    # tasks: yes/no closed, other short answers open (answer = the clean text), IU-Xray reports
    assert {x.task for x in iu} == {"report"} and all(x.answer is None for x in iu)
    yes = next(x for x in rad if x.target == "Yes")
    assert yes.task == "vqa_closed" and yes.answer == "Yes"
    mri = slake[0]
    assert mri.task == "vqa_open" and mri.answer == "MRI"


def test_mmedpo_real_file_reports_missing_images_by_path():
    path = _shared("slake_dpo_weighted.sample.json")
    with pytest.raises(RecordError) as e:
        mmedpo.read(path)  # images are not shipped beside the sample file
    assert e.value.file == str(path) and e.value.record == 0 and e.value.field == "image"
    # a JSON array position, not a line number: "file:0" would send the reader to a line
    assert f"{path} record [0] field 'image'" in str(e.value) and f"{path}:0" not in str(e.value)
    assert "image not found" in str(e.value) and str((path.parent / "xmlab1" / "source.jpg").resolve()) in str(e.value)


def test_mmedpo_real_file_with_images_under_a_root(tmp_path):
    path = _shared("vqa-rad_dpo_weighted.sample.json")
    for r in json.loads(path.read_text(encoding="utf-8")):
        _png(tmp_path / r["image"])
    samples = mmedpo.read(path, root=tmp_path)
    assert len(samples) == 15 and all(Path(p).exists() for s in samples for p in s.images)


def test_mmedpo_visual_pairs_and_noised_flag():
    samples = mmedpo.read(FIX / "mmedpo" / "visual_pairs.json", root=FIX)
    a, b = samples
    assert a.rejected.images == [str(FIX / "noised" / "ct_0.png")] and a.images == [str(FIX / "images" / "ct_0.png")]
    assert a.weight == 0.7 and a.task == "vqa_closed" and a.answer == "Yes"
    assert "rejected_noised" not in a.meta
    assert b.meta["rejected_noised"] is True and b.rejected.images is None
    assert b.weight == 0.0 and b.id == "CXR2_IM-1" and b.target == "No acute cardiopulmonary process."


def test_mmedpo_every_released_scaffold_shape_is_cleaned_and_yes_no_is_closed():
    """One verbatim record of each scaffold shape in the released SLAKE / VQA-RAD files (a blank line
    after the question, "- " bullets, no candidates, blank lines between candidates, whitespace runs)."""
    slake = mmedpo.read(_shared("slake_dpo_weighted.scaffold.json"), check_images=False)
    rad = mmedpo.read(_shared("vqa-rad_dpo_weighted.scaffold.json"), check_images=False)
    got = {s.id: (s.target, s.task) for s in slake + rad}
    assert got == {
        "128": ("Yes", "vqa_closed"),
        "298": ("Yes", "vqa_closed"),
        "504": ("Pneumothorax", "vqa_open"),
        "965": ("No", "vqa_closed"),
        "835": ("Liver Cancer", "vqa_open"),
        "1580": ("Abdomen", "vqa_open"),
        "1283": ("Right Lung", "vqa_open"),
        "2646": ("No", "vqa_closed"),
        "2935": ("Control heartbeat and breathing", "vqa_open"),
        "170": ("Yes", "vqa_closed"),
        "424": ("No", "vqa_closed"),
        "153": ("Yes", "vqa_closed"),
        "696": ("cecum", "vqa_open"),
        "2071": ("No", "vqa_closed"),
    }
    assert all(s.meta["scaffolding"] and s.meta["raw_chosen"].startswith("Question:") for s in slake + rad)
    assert all(s.answer == s.target for s in slake + rad)
    assert mmedpo.clean_answer("Question: Q?\n-Original Answer: Mass\n-Candidate Answer1: Cyst\n") == ("Mass", True)


def test_mmedpo_identical_pairs_are_dropped_and_counted(caplog):
    """SLAKE pairs 704 and 4204 (two of the five in the released file) have chosen == rejected."""
    path = _shared("slake_dpo_weighted.scaffold.json")
    with caplog.at_level("WARNING", logger="unveil.data.adapters.mmedpo"):
        samples = mmedpo.read(path, check_images=False)
    assert {"704", "4204"}.isdisjoint(s.id for s in samples) and len(samples) == 9
    assert samples.dropped == {"identical_pair": 2} and samples.skipped == 0
    assert "dropped 2 pair(s)" in caplog.text and "'704'" in caplog.text and "'4204'" in caplog.text
    kept = mmedpo.read(path, check_images=False, drop_identical=False)
    assert len(kept) == 11 and kept.dropped == {}
    assert next(s for s in kept if s.id == "704").meta["identical_pair"] is True


# ==========================================================================================
# LLaVA / LLaVA-Med
# ==========================================================================================
def test_llava_instruction_json_multi_turn():
    samples = llava.read(FIX / "llava" / "instruct.json", root=FIX)
    _all_valid(samples)
    a, b, c, d = samples
    assert [m["role"] for m in a.messages] == ["user", "assistant", "user", "assistant"]
    assert a.prompt_messages == a.messages[:3] and a.target.startswith("Yes, a hypodense")
    assert a.images == [str(FIX / "pmc" / "fig_1.png")] and a.task == "vqa_open" and a.answer is None
    # same id twice: the repeat is renamed, the original kept
    assert a.id == "PMC-0001_fig1" and b.id == "PMC-0001_fig1#2" and b.meta["orig_id"] == "PMC-0001_fig1"
    # an image without a placeholder gets one at the start of the first user turn
    assert b.messages[0]["content"] == "<image>\nDescribe the figure in detail." and b.meta["placeholder_added"]
    assert "\u2014" in b.target
    # text-only record with a system turn and an int id
    assert c.id == "17" and c.images == [] and c.messages[0]["role"] == "system"
    # a list of images
    assert len(d.images) == 2 and d.messages[0]["content"].count(IMAGE_PLACEHOLDER) == 2


def test_llava_med_eval_jsonl():
    samples = llava.read(FIX / "llava" / "eval_qa.jsonl", root=FIX, image_dir="images")
    _all_valid(samples)
    a, b, c = samples  # a blank line in the file is ignored
    assert [s.id for s in samples] == ["1", "2", "3"]
    assert a.images == [str(FIX / "images" / "ct_0.png")]
    # the trailing "\n<image>" moves to the front, as LLaVA-Med's model_vqa.py does
    assert a.messages[0]["content"] == "<image>\nWhat is the location of the mass?"
    assert a.meta["raw_text"] == "What is the location of the mass?\n<image>"
    assert a.target.startswith("The mass is in the left upper quadrant") and a.answer is None
    assert a.task == "vqa_open" and a.modality == "ct" and a.meta["domains"] == ["ct"]
    assert a.meta["pair_id"] == "31911455_F2" and a.meta["in_text_mention"] is None
    # two domains true: the first (in chest_xray, ct_scan, mri, histology, gross order) is the modality
    assert b.task == "describe" and b.modality == "xray" and b.meta["domains"] == ["xray", "ct"]
    assert b.meta["in_text_mention"][0]["tokens"].startswith("Chest X-ray")
    assert c.modality == "mri"
    # without image_dir the bare file names are looked up in the root itself
    with pytest.raises(RecordError, match="image not found"):
        llava.read(FIX / "llava" / "eval_qa.jsonl", root=FIX)


# ==========================================================================================
# Med-MIM
# ==========================================================================================
@pytest.mark.parametrize(
    "name,ability,held_out",
    [
        ("MedMIM_Held_in_Temporal.json", "temporal", False),
        ("MedMIM_Held_in_Reasoning.json", "reasoning", False),
        ("MedMIM_Held_in_Comparison.json", "comparison", False),
        ("MedMIM_Held_in_Coreference.json", "coreference", False),
        ("MedMIM_Held_out_ODIR.json", "held_out_odir", True),
        ("MedMIM_Held_out_RAD.json", "held_out_rad", True),
    ],
)
def test_med_mim_ability_from_file_name(name, ability, held_out):
    samples = med_mim.read(FIX / "med_mim" / name, root=FIX)
    _all_valid(samples)
    assert samples and all(s.meta["ability"] == ability and s.meta["held_out"] is held_out for s in samples)
    for s in samples:
        assert len(s.images) in (2, 3) and s.messages[0]["content"].startswith(IMAGE_PLACEHOLDER * len(s.images))


def test_med_mim_multiple_choice_and_open():
    tem = med_mim.read(FIX / "med_mim" / "MedMIM_Held_in_Temporal.json", root=FIX)
    a, b = tem
    assert a.task == "mcq" and a.answer == "C: worsening" and a.meta["answer_letter"] == "C"
    assert a.meta["options"] == {"A": "improving", "B": "stable", "C": "worsening"}  # trailing spaces tolerated
    assert "answer_option_mismatch" not in a.meta and a.modality == "xray"
    assert len(b.images) == 3 and b.task == "mcq" and b.modality == "mri"
    conv = med_mim.read(FIX / "med_mim" / "MedMIM_Held_in_Comparison.json", root=FIX)[0]
    assert conv.task == "vqa_open" and conv.answer is None and conv.meta["source"] == "MS_CXR_T_conv_edema"
    rea = med_mim.read(FIX / "med_mim" / "MedMIM_Held_in_Reasoning.json", root=FIX)[0]
    assert rea.task == "vqa_closed" and rea.answer == "Yes"
    rad = med_mim.read(FIX / "med_mim" / "MedMIM_Held_out_RAD.json", root=FIX)[0]
    assert rad.task == "vqa_open" and rad.answer == "the liver"


def test_med_mim_ids_made_unique_and_paths_with_spaces():
    cor = med_mim.read(FIX / "med_mim" / "MedMIM_Held_in_Coreference.json", root=FIX)
    assert [s.meta["orig_id"] for s in cor] == ["EMBED-7", "EMBED-7"]
    assert len({s.id for s in cor}) == 2 and all(s.id.startswith("coreference/EMBED-7") for s in cor)
    odir = med_mim.read(FIX / "med_mim" / "MedMIM_Held_out_ODIR.json", root=FIX)[0]
    assert odir.meta["orig_id"] == "VQA_RAD-0" and odir.id.startswith(
        "held_out_odir/"
    )  # mislabelled ids stay traceable
    assert odir.images[0] == str(FIX / "Training Images" / "12_left.jpg") and Path(odir.images[0]).exists()
    assert odir.modality == "fundus" and odir.answer == "B: diabetic retinopathy"
    rad = med_mim.read(FIX / "med_mim" / "MedMIM_Held_out_RAD.json", root=FIX)[0]
    assert rad.meta["orig_id"] == odir.meta["orig_id"] and rad.id != odir.id


def test_med_mim_ability_override_and_unknown_name(tmp_path):
    src = FIX / "med_mim" / "MedMIM_Held_in_Temporal.json"
    renamed = tmp_path / "train.json"
    shutil.copy(src, renamed)
    assert {s.meta["ability"] for s in med_mim.read(renamed, root=FIX)} == {"unknown"}
    assert {s.meta["ability"] for s in med_mim.read(renamed, root=FIX, ability="temporal")} == {"temporal"}
    inst = tmp_path / "Med_MIM_train_inherent_Comparison.json"
    shutil.copy(src, inst)
    assert {s.meta["ability"] for s in med_mim.read(inst, root=FIX)} == {"comparison"}


# ==========================================================================================
# VQA tables
# ==========================================================================================
def test_slake_json_language_filter_and_modality():
    path = FIX / "vqa" / "slake.json"
    every = vqa_table.read(path, root=FIX, image_dir="images")
    assert len(every) == 4
    en = vqa_table.read(path, root=FIX, image_dir="images", lang="en")
    assert [s.id for s in en] == ["0", "2", "3"] and en.filtered == 1
    _all_valid(en)
    a, b, c = en
    assert a.messages == [
        {"role": "user", "content": "<image>\nWhich organ is abnormal?"},
        {"role": "assistant", "content": "Lung"},
    ]
    assert a.task == "vqa_open" and a.answer == "Lung" and a.modality == "xray"
    assert b.task == "vqa_closed" and b.answer == "Yes" and b.modality == "ct"
    assert c.modality == "mri" and c.meta["content_type"] == "Modality" and c.meta["q_lang"] == "en"
    zh = vqa_table.read(path, root=FIX, image_dir="images", lang="zh")
    assert [s.answer for s in zh] == ["\u80ba"]


def test_vqa_rad_numbers_types_and_duplicate_ids():
    samples = vqa_table.read(FIX / "vqa" / "vqa_rad.json", root=FIX, image_dir="images")
    a, b, c = samples
    assert a.answer == "2" and a.meta["raw_answer"] == 2 and a.task == "vqa_open"
    assert b.task == c.task == "vqa_closed"  # "CLOSED " with a trailing space
    assert a.meta["image_organ"] == "ABD" and b.meta["question_type"] == "PRES"
    assert [s.id for s in samples] == ["0", "1", "1#2"]


def test_pathvqa_csv_yes_no_closed():
    samples = vqa_table.read(FIX / "vqa" / "pathvqa.csv", root=FIX)
    assert [s.task for s in samples] == ["vqa_closed", "vqa_open", "vqa_closed"]
    assert samples[1].messages[0]["content"] == "<image>\nwhat is present, according to the stain?"
    assert [s.id for s in samples] == ["2", "3", "4"]  # CSV line numbers (header is line 1)
    assert samples[2].answer == "No"


def test_slake_jsonl():
    samples = vqa_table.read(FIX / "vqa" / "slake.jsonl", root=FIX, image_dir="images")
    assert [(s.id, s.task) for s in samples] == [("10", "vqa_open"), ("11", "vqa_closed")]


def test_parquet_with_image_bytes_and_custom_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    img1, img2 = _png_bytes(value=10), _png_bytes(value=200)
    table = pa.table(
        {
            "image": [
                {"bytes": img1, "path": "a.png"},
                {"bytes": img2, "path": None},
                {"bytes": img1, "path": "a.png"},
            ],
            "q": ["is this normal?", "what organ is shown?", "is there a lesion?"],
            "a": ["no", "liver", "yes"],
        }
    )
    path = tmp_path / "pathvqa.parquet"
    pq.write_table(table, path)
    cache = tmp_path / "cache"
    samples = vqa_table.read(path, question_key="q", answer_key="a", image_cache=cache)
    assert [s.task for s in samples] == ["vqa_closed", "vqa_open", "vqa_closed"]
    assert [s.id for s in samples] == ["0", "1", "2"]
    assert samples[0].images == samples[2].images != samples[1].images  # content-addressed, written once
    assert len(list(cache.iterdir())) == 2
    assert Path(samples[1].images[0]).suffix == ".png" and Path(samples[1].images[0]).parent == cache
    assert load_image(samples[1].images[0]).getpixel((0, 0)) == (200, 0, 0)
    assert all(validate_sample(s) == [] for s in samples)


def test_parquet_raw_bytes_default_cache_and_paths(tmp_path):
    tmp_path = tmp_path.resolve()  # adapters return resolved paths
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [_png_bytes()], "question": ["q?"], "answer": ["yes"]}), tmp_path / "b.parquet")
    s = vqa_table.read(tmp_path / "b.parquet")[0]
    assert Path(s.images[0]).parent == tmp_path / ".image_cache" and Path(s.images[0]).exists()
    _png(tmp_path / "imgs" / "x.png")
    pq.write_table(
        pa.table({"img_name": ["x.png"], "question": ["q?"], "answer": ["left"], "answer_type": ["OPEN"]}),
        tmp_path / "c.parquet",
    )
    s = vqa_table.read(tmp_path / "c.parquet", image_dir="imgs")[0]
    assert s.images == [str(tmp_path / "imgs" / "x.png")] and s.task == "vqa_open"


def test_undecodable_image_bytes_are_a_record_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    pq.write_table(
        pa.table({"image": [_png_bytes(), b"not an image"], "question": ["a?", "b?"], "answer": ["yes", "no"]}), path
    )
    with pytest.raises(RecordError) as e:
        vqa_table.read(path, image_cache=tmp_path / "c")
    assert (e.value.file, e.value.record, e.value.field) == (str(path), 1, "image") and "undecodable" in str(e.value)


# ==========================================================================================
# STLLaVA-Med DPO
# ==========================================================================================
def test_stllava_dpo_pairs_with_virtual_user():
    samples = stllava_dpo.read(FIX / "stllava" / "dpo.json", root=FIX)
    _all_valid(samples)
    a, b = samples
    assert [m["role"] for m in a.messages] == ["user", "assistant", "virtual_user", "assistant"]
    assert a.rejected.messages[-1] == {"role": "assistant", "content": "In the left kidney."}
    assert a.rejected.messages[:3] == a.messages[:3] and a.rejected.images is None
    assert a.meta["conversations"][0] == {"role": "user", "content": "<image>\nDescribe the image."}
    assert a.meta["has_virtual_user"] and "prompt_differs" not in a.meta
    assert b.images == [] and b.id == "1" and b.rejected.messages[-1]["content"] == "Fluid in the pericardium."


# ==========================================================================================
# malformed records: every error names file, record and field; skip counts
# ==========================================================================================
def _write(tmp_path: Path, name: str, records) -> Path:
    p = tmp_path / name
    if name.endswith(".jsonl"):
        p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    else:
        p.write_text(json.dumps(records), encoding="utf-8")
    return p


def _good(fmt: str) -> dict:
    conv = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": " yes"}]
    return {
        "llava": {"id": "a", "image": "img.png", "conversations": conv},
        "llava_eval": {
            "question_id": 1,
            "image": "img.png",
            "text": "Q?\n<image>",
            "gpt4_answer": "A.",
            "domain": {"ct_scan": True},
            "type": "conversation",
        },
        "med_mim": {
            "id": "x",
            "images": ["img.png", "img.png"],
            "source": "s_vqa",
            "conversation": [{"role": "user", "content": "<image><image>Q?"}, {"role": "assistant", "content": "no"}],
        },
        "vqa_table": {"qid": 1, "img_name": "img.png", "question": "Q?", "answer": "yes", "answer_type": "CLOSED"},
        "mmedpo": {
            "id": 1,
            "image": "img.png",
            "conversations": conv,
            "rejected_conversations": conv[:1] + [{"from": "gpt", "value": " no"}],
            "weighted_score": 0.5,
        },
        "stllava_dpo": {
            "image": "img.png",
            "chosen_conversations": conv,
            "reject_conversations": conv[:1] + [{"from": "gpt", "value": "no"}],
        },
    }[fmt]


def _set(rec: dict, dotted: str, value):
    """Set (or with value=KeyError delete) a nested field given as 'a.0.b'."""
    keys = dotted.split(".")
    cur = rec
    for k in keys[:-1]:
        cur = cur[int(k)] if isinstance(cur, list) else cur[k]
    last = int(keys[-1]) if isinstance(cur, list) else keys[-1]
    if value is KeyError:
        del cur[last]
    else:
        cur[last] = value
    return rec


# (adapter, kind of record, file suffix, change, expected field in the error, text in the message)
BAD = [
    ("llava", "llava", ".json", ("conversations", KeyError), "conversations", "missing"),
    ("llava", "llava", ".json", ("conversations", "hi"), "conversations", "expected list"),
    ("llava", "llava", ".json", ("conversations.1.from", "robot"), "conversations[1].from", "unknown speaker"),
    ("llava", "llava", ".json", ("conversations.0.value", 3), "conversations[0].value", "expected a string"),
    ("llava", "llava", ".json", ("image", "missing.png"), "image", "image not found"),
    ("llava", "llava", ".json", ("image", "../outside.png"), "image", "escapes the data root"),
    ("llava", "llava", ".json", ("conversations.0.value", "<image><image>\nQ?"), "conversations", "2 '<image>'"),
    ("llava", "llava_eval", ".jsonl", ("gpt4_answer", KeyError), "gpt4_answer", "missing"),
    ("llava", "llava_eval", ".jsonl", ("domain", {"ct_scan": "yes"}), "domain", "booleans"),
    ("llava", "llava_eval", ".jsonl", ("text", "<image> Q <image>"), "text", "2 '<image>'"),
    ("med_mim", "med_mim", ".json", ("images", "img.png"), "images", "expected list"),
    ("med_mim", "med_mim", ".json", ("conversation.0.content", "<image>Q?"), "conversation", "1 '<image>'"),
    ("med_mim", "med_mim", ".json", ("conversation.1.role", "gpt"), "conversation[1].role", "expected 'user'"),
    ("med_mim", "med_mim", ".json", ("images.1", "nope dir/x.jpg"), "images[1]", "image not found"),
    ("med_mim", "med_mim", ".json", ("images.0", "/etc/passwd"), "images[0]", "escapes the data root"),
    ("med_mim", "med_mim", ".json", ("source", "X_multichoice_typeA"), "conversation[1].content", "multiple-choice"),
    ("vqa_table", "vqa_table", ".json", ("question", KeyError), "question", "missing"),
    ("vqa_table", "vqa_table", ".json", ("answer", ["a"]), "answer", "expected a string"),
    ("vqa_table", "vqa_table", ".json", ("answer_type", "maybe"), "answer_type", "OPEN or CLOSED"),
    ("vqa_table", "vqa_table", ".json", ("img_name", "gone.png"), "img_name", "image not found"),
    ("vqa_table", "vqa_table", ".jsonl", ("img_name", "../../x.png"), "img_name", "escapes the data root"),
    ("vqa_table", "vqa_table", ".json", ("question", "<image><image>Q"), "question", "2 '<image>'"),
    ("mmedpo", "mmedpo", ".json", ("weighted_score", KeyError), "weighted_score", "missing"),
    ("mmedpo", "mmedpo", ".json", ("weighted_score", "0.5"), "weighted_score", "finite number"),
    ("mmedpo", "mmedpo", ".json", ("weighted_score", -0.1), "weighted_score", ">= 0"),
    (
        "mmedpo",
        "mmedpo",
        ".json",
        ("rejected_conversations.0.value", "<image>\nOther?"),
        "rejected_conversations",
        "differ",
    ),
    ("mmedpo", "mmedpo", ".json", ("rejected_image", "noised/none.png"), "rejected_image", "image not found"),
    ("mmedpo", "mmedpo", ".json", ("rejected_image", "../x.png"), "rejected_image", "escapes the data root"),
    ("mmedpo", "mmedpo", ".json", ("rejected_noised", 2), "rejected_noised", "0 or 1"),
    ("mmedpo", "mmedpo", ".json", ("conversations.0.value", "Q without image"), "conversations", "0 '<image>'"),
    ("stllava_dpo", "stllava_dpo", ".json", ("reject_conversations", KeyError), "reject_conversations", "missing"),
    (
        "stllava_dpo",
        "stllava_dpo",
        ".json",
        ("chosen_conversations.1.from", "bot"),
        "chosen_conversations[1].from",
        "unknown",
    ),
    (
        "stllava_dpo",
        "stllava_dpo",
        ".json",
        ("reject_conversations.0.value", "Q?"),
        "reject_conversations",
        "0 '<image>'",
    ),
    ("stllava_dpo", "stllava_dpo", ".json", ("image", 5), "image", "expected a path"),
]


@pytest.mark.parametrize("fmt,kind,suffix,change,field,text", BAD, ids=[f"{b[1]}-{b[4]}-{b[5][:14]}" for b in BAD])
def test_bad_record_names_file_record_and_field(tmp_path, fmt, kind, suffix, change, field, text):
    root = tmp_path / "root"
    _png(root / "img.png")
    _png(root / "noised" / "img.png")
    good = _good(kind)
    bad = _set(json.loads(json.dumps(good)), *change)
    path = _write(root, f"data{suffix}", [good, bad, good])
    with pytest.raises(RecordError) as e:
        read(fmt, path, root=root)
    err = e.value
    record = 2 if suffix == ".jsonl" else 1  # JSONL: line number; JSON array: index
    assert (err.file, err.record, err.field) == (str(path), record, field), str(err)
    msg = str(err)
    assert str(path) in msg and f"field '{field}'" in msg and text in msg, msg
    # a line reads file:2, an array position file record [1] (file:1 would send the reader to a line)
    assert (f"{path}:{record} " if suffix == ".jsonl" else f"{path} record [{record}] ") in msg
    # skip: the bad record is dropped and counted, the good ones load
    kept = read(fmt, path, root=root, on_bad_record="skip")
    assert len(kept) == 2 and kept.skipped == 1


@pytest.mark.parametrize("fmt,kind", [("llava", "llava_eval"), ("vqa_table", "vqa_table"), ("llava", "llava")])
def test_malformed_json_line_is_a_record_error(tmp_path, fmt, kind):
    _png(tmp_path / "img.png")
    good = json.dumps(_good(kind))
    path = _write(tmp_path, "d.jsonl", [good, '{"id": "x", "conversations": [', good, good])
    with pytest.raises(RecordError) as e:
        read(fmt, path)
    assert e.value.file == str(path) and e.value.record == 2 and "malformed JSON" in str(e.value)
    assert f"{path}:2" in str(e.value)
    kept = read(fmt, path, on_bad_record="skip")
    assert len(kept) == 3 and kept.skipped == 1


def test_malformed_json_array_and_csv_rows(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[{"id": 1,', encoding="utf-8")
    for fmt in FORMATS:
        with pytest.raises(RecordError, match="malformed JSON") as e:
            read(fmt, p)
        assert e.value.file == str(p)
    _png(tmp_path / "img.png")
    c = tmp_path / "t.csv"
    c.write_text("image,question,answer\nimg.png,q?,yes\nimg.png,q?,yes,extra\nimg.png,,no\n", encoding="utf-8")
    with pytest.raises(RecordError) as e:
        vqa_table.read(c)
    assert (e.value.record, "more than the header") == (3, "more than the header") and str(c) in str(e.value)
    kept = vqa_table.read(c, on_bad_record="skip")
    assert len(kept) == 1 and kept.skipped == 2


def test_non_object_records_and_missing_files(tmp_path):
    p = _write(tmp_path, "d.json", [_good("med_mim"), ["not", "a", "record"]])
    _png(tmp_path / "img.png")
    with pytest.raises(RecordError, match="expected a JSON object") as e:
        med_mim.read(p)
    assert e.value.record == 1
    for fmt in FORMATS:
        with pytest.raises(RecordError, match="file not found"):
            read(fmt, tmp_path / "nope.json")
    with pytest.raises(RecordError, match="unknown table format"):
        vqa_table.read(_write(tmp_path, "x.xml", []))
    with pytest.raises(RecordError, match=r"lang='en'") as e:
        vqa_table.read(_write(tmp_path, "nolang.json", [_good("vqa_table")]), lang="en")
    assert e.value.field == "q_lang"


def test_mmedpo_file_given_to_stllava_says_so(tmp_path):
    _png(tmp_path / "img.png")
    with pytest.raises(RecordError, match="format=mmedpo"):
        stllava_dpo.read(_write(tmp_path, "d.json", [_good("mmedpo")]))


def test_check_images_false_skips_the_existence_check_but_not_the_root_check(tmp_path):
    tmp_path = tmp_path.resolve()  # adapters return resolved paths
    rec = _good("llava")
    rec["image"] = "not/there.png"
    s = llava.read(_write(tmp_path, "d.json", [rec]), check_images=False)[0]
    assert s.images == [str(tmp_path / "not" / "there.png")]
    rec["image"] = "../../escape.png"
    with pytest.raises(RecordError, match="escapes"):
        llava.read(_write(tmp_path, "e.json", [rec]), check_images=False)


def test_llava_med_alignment_spelling_and_mantis_image_lists(tmp_path):
    """LLaVA-Med's alignment records spell the key "conversatons" (its own loader accepts it), and
    Mantis-style records list their images under "images": both load; giving both keys is an error."""
    tmp_path = tmp_path.resolve()
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    align = {
        "id": "pmc-1",
        "image": "a.png",
        "conversatons": [
            {"from": "human", "value": "<image>\nDescribe the figure."},
            {"from": "gpt", "value": "A CT of the chest."},
        ],
    }
    mantis = {
        "id": "m-1",
        "images": ["a.png", "b.png"],
        "conversations": [
            {"from": "human", "value": "<image> <image> Which image shows the lesion?"},
            {"from": "gpt", "value": "The second."},
        ],
    }
    s, m = llava.read(_write(tmp_path, "d.json", [align, mantis]))
    assert s.target == "A CT of the chest." and s.images == [str(tmp_path / "a.png")]
    assert m.images == [str(tmp_path / "a.png"), str(tmp_path / "b.png")] and m.target == "The second."
    both = {**mantis, "image": "a.png"}
    with pytest.raises(RecordError, match="'images'.*both 'image' and 'images'"):
        llava.read(_write(tmp_path, "e.json", [both]))
