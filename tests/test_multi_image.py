"""Multi-image synthetic studies (Med-MIM style) and per-ability multiple-choice evaluation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unveil.data.adapters import mau_jsonl
from unveil.data.records import load_records
from unveil.data.schema import IMAGE_PLACEHOLDER, validate_sample
from unveil.data.synthetic.multi_image import COMPARISON, TEMPORAL, MultiImageConfig, chance, generate_multi_image
from unveil.eval.evaluate import mcq_letter

SPLITS = ("train", "val", "test")


def _records(d: Path) -> list[dict]:
    return [json.loads(l) for s in SPLITS for l in open(d / f"{s}.jsonl")]


def _area(b) -> float:
    return (b[2] - b[0]) * (b[3] - b[1])


def _px(d: Path, rel: str) -> np.ndarray:
    return np.asarray(Image.open(d / rel).convert("RGB"), dtype=np.float32)


@pytest.fixture(scope="module")
def mim(tmp_path_factory) -> Path:
    cfg = MultiImageConfig(n_patients=60, abilities={"comparison": 3, "temporal": 2, "coreference": 2}, seed=5)
    return generate_multi_image(cfg, tmp_path_factory.mktemp("mim"))


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    kw = dict(n_patients=8, abilities={"comparison": 1, "temporal": 1, "coreference": 1})
    a = generate_multi_image(MultiImageConfig(seed=1, **kw), tmp_path / "a")
    b = generate_multi_image(MultiImageConfig(seed=1, **kw), tmp_path / "b")
    c = generate_multi_image(MultiImageConfig(seed=2, **kw), tmp_path / "c")
    text = lambda d: [(d / f"{s}.jsonl").read_text() for s in SPLITS]  # noqa: E731
    assert text(a) == text(b) and text(a) != text(c)
    names = sorted(p.name for p in (a / "images").iterdir())
    assert names and names == sorted(p.name for p in (b / "images").iterdir())
    for n in names:
        assert (a / "images" / n).read_bytes() == (b / "images" / n).read_bytes()
    # a finished set is not rewritten; a changed config is
    stamp = (a / "info.json").stat().st_mtime_ns
    generate_multi_image(MultiImageConfig(seed=1, **kw), a)
    assert (a / "info.json").stat().st_mtime_ns == stamp
    assert MultiImageConfig(seed=1, **kw).fingerprint() != MultiImageConfig(seed=1, noise=0.03, **kw).fingerprint()


def test_placeholders_match_images_med_mim_style(mim):
    raw = _records(mim)
    assert {r["ability"] for r in raw} == {"comparison", "temporal", "coreference"}
    for r in raw:
        n = len(r["images"])
        assert n == {"comparison": 2, "temporal": 3}.get(r["ability"], n) and 2 <= n <= 3
        assert r["query"].startswith(IMAGE_PLACEHOLDER * n) and r["query"].count(IMAGE_PLACEHOLDER) == n
        assert r["task"] == "mcq" and r["answer"] == r["short_answer"]
    samples = [s for split in SPLITS for s in mau_jsonl.read(mim / f"{split}.jsonl", root=mim)]
    assert len(samples) == len(raw)
    for s in samples:
        assert validate_sample(s) == []
        assert s.messages[0]["content"].count(IMAGE_PLACEHOLDER) == len(s.images) and all(
            Path(p).exists() for p in s.images
        )
        assert (
            s.task == "mcq" and s.meta["ability"] in ("comparison", "temporal", "coreference") and s.meta["modality"]
        )
        assert all(0 <= k < len(s.images) for k in s.box_images)
    assert len({s.id for s in samples}) == len(samples)


def test_options_are_med_mim_lines_and_answer_letters_balanced(mim):
    raw = _records(mim)
    for r in raw:
        lines = r["query"].split("\n")[1:]
        assert lines == [f"{k}: {t}" for k, t in r["options"].items()]
        letter = mcq_letter(r["answer"])
        assert (
            letter == r["answer_letter"]
            and r["answer"] in lines
            and r["answer"] == f"{letter}: {r['options'][letter]}"
        )
    comp = [r for r in raw if r["ability"] == "comparison"]
    letters = Counter(r["answer_letter"] for r in comp)
    labels = Counter(r["label"] for r in comp)
    assert set(letters) == set("ABCDE") and set(labels) == {"grown", "shrunk", "new", "resolved", "unchanged"}
    n = len(comp)  # 180 records: each of 5 letters/labels expected 36
    assert all(0.5 * n / 5 < c < 1.5 * n / 5 for c in letters.values()), letters
    assert all(0.5 * n / 5 < c < 1.5 * n / 5 for c in labels.values()), labels
    # the same label sits behind different letters: the letter alone does not give it away
    assert all(len({r["answer_letter"] for r in comp if r["label"] == lab}) >= 4 for lab in labels)
    ch = chance(raw)
    assert ch["comparison"] == pytest.approx(0.2) and ch["temporal"] == pytest.approx(0.25)
    assert 1 / 3 < ch["coreference"] < 1 / 2
    info = json.loads((mim / "info.json").read_text())
    assert info["chance"]["test"]["comparison"] == pytest.approx(0.2)


def test_comparison_answers_match_the_rendered_images(mim):
    seen = set()
    for r in (r for r in _records(mim) if r["ability"] == "comparison"):
        prior, cur = r["image_boxes"]
        lab = r["label"]
        seen.add(lab)
        if lab == "grown":
            assert len(prior) == len(cur) == 1 and _area(cur[0]) > 2 * _area(prior[0])
        elif lab == "shrunk":
            assert len(prior) == len(cur) == 1 and _area(prior[0]) > 2 * _area(cur[0])
        elif lab == "new":
            assert not prior and len(cur) == 1
        elif lab == "resolved":
            assert len(prior) == 1 and not cur
        else:
            assert prior == cur and len(cur) == 1
        assert r["boxes"] == cur and r["box_image"] == [1] * len(cur)
        # pixels: the same background, so the two images differ beyond noise only at the lesion
        a, b = (_px(mim, p) for p in r["images"])
        diff = np.abs(a - b).mean(-1)
        h, w = diff.shape
        inside = np.zeros_like(diff, dtype=bool)
        for x1, y1, x2, y2 in prior + cur:
            inside[
                max(0, int(y1 * h) - 1) : int(np.ceil(y2 * h)) + 1, max(0, int(x1 * w) - 1) : int(np.ceil(x2 * w)) + 1
            ] = True
        assert diff[~inside].mean() < 10  # acquisition noise only (sigma 0.02 * 255 per image)
        if lab == "unchanged":
            assert diff[inside].mean() < 10
        else:
            assert diff[inside].mean() > 15
    assert seen == {"grown", "shrunk", "new", "resolved", "unchanged"}


def test_temporal_and_coreference_answers_match_the_images(mim):
    raw = _records(mim)
    for r in (r for r in raw if r["ability"] == "temporal"):
        areas = [_area(b[0]) if b else 0.0 for b in r["image_boxes"]]
        lab = r["label"]
        if lab == "increasing":
            assert 0 < areas[0] < areas[1] < areas[2]
        elif lab == "decreasing":
            assert areas[0] > areas[1] > areas[2] > 0
        elif lab == "stable":
            assert areas[0] == areas[1] == areas[2] > 0
        else:
            assert areas[0] == areas[2] == 0 < areas[1]
    cor = [r for r in raw if r["ability"] == "coreference"]
    assert {len(r["images"]) for r in cor} == {2, 3}
    for r in cor:
        k = int(r["label"].split()[-1]) - 1
        has = [r["target_finding"] in f for f in r["image_findings"]]
        assert has[k] and sum(has) == 1
        assert r["findings"] == [r["target_finding"]] and r["box_image"] == [k]
        assert r["target_finding"] in r["query"]


def test_splits_by_patient(mim):
    pats = {s: {json.loads(l)["patient_id"] for l in open(mim / f"{s}.jsonl")} for s in SPLITS}
    assert all(pats.values())
    assert (
        not (pats["train"] & pats["val"]) and not (pats["train"] & pats["test"]) and not (pats["val"] & pats["test"])
    )


@pytest.fixture(scope="module")
def mim_setup(tmp_path_factory):
    """The experiment's real config, shrunk: datamodule (via the `kind: multi_image` hook) + backbone."""
    from conftest import compose

    from unveil.models.factory import build_backbone

    tmp = tmp_path_factory.mktemp("mimcfg")
    cfg = compose(["experiment=mim_sft", "data.synthetic.n_patients=16"], tmp=tmp)
    assert cfg.optimized_metric == "test/mcq_acc" and cfg.data.synthetic._target_.endswith("MultiImageConfig")
    dm = load_records(cfg.data)
    bb = build_backbone(cfg.model, corpus=dm.corpus(), cache_dir=cfg.paths.cache_dir)
    return cfg, dm, bb


def test_two_image_sample_through_the_sft_collator(mim_setup):
    from unveil.data.collate import IGNORE, SFTCollator

    cfg, dm, bb = mim_setup
    samples = [s for split in dm.data.values() for s in split]
    two = [s for s in samples if s.meta["ability"] == "comparison"][:2]
    three = [s for s in samples if len(s.images) == 3][:1]
    batch = SFTCollator(bb)(two + three)
    per_image = (cfg.model.spec.image_size // cfg.model.spec.patch_size) ** 2
    image_id = bb.base_model.config.image_token_index
    assert per_image == 16
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [2 * per_image, 2 * per_image, 3 * per_image]
    assert batch["pixel_values"].shape[0] == 7
    for i, s in enumerate(two + three):
        trained = batch["labels"][i][batch["labels"][i] != IGNORE]
        assert bb.tokenizer.decode(trained, skip_special_tokens=True).strip() == s.target
    with torch.no_grad():
        loss = bb.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}).loss
    assert torch.isfinite(loss)


def test_open_twins_share_images_and_answer_with_the_option_text(tmp_path):
    kw = dict(n_patients=6, abilities={"comparison": 1, "temporal": 1, "coreference": 1}, seed=4)
    plain = _records(generate_multi_image(MultiImageConfig(**kw), tmp_path / "a"))
    both = _records(generate_multi_image(MultiImageConfig(open_questions=True, **kw), tmp_path / "b"))
    mcq = [r for r in both if r["task"] == "mcq"]
    opened = {r["id"]: r for r in both if r["task"] == "vqa_closed"}
    assert mcq == plain and len(opened) == len(mcq)  # the multiple-choice items are unchanged
    for r in mcq:
        o = opened[r["id"] + "-open"]
        assert o["images"] == r["images"] and o["ability"] == r["ability"] and o["patient_id"] == r["patient_id"]
        assert o["query"] == r["query"].split("\n")[0] and "A:" not in o["query"]
        assert o["answer"] == o["short_answer"] == r["options"][r["answer_letter"]] and "options" not in o
    assert chance(both) == chance(plain)


def test_evaluate_reports_mcq_accuracy_per_ability(mim_setup, monkeypatch):
    from unveil.eval import evaluate as ev

    _, dm, bb = mim_setup
    # the experiment's data has open twins; its training split also has the warm-up's
    # localisation records, which SFT and evaluation never see
    assert {s.task for s in dm.data["train"]} == {"mcq", "vqa_closed", "localize"}
    assert {s.task for s in dm.data["test"]} == {"mcq", "vqa_closed"}
    samples = [s for s in dm.data["train"] if s.task != "localize"]
    mcq = [s for s in samples if s.task == "mcq"]
    by_ability = Counter(s.meta["ability"] for s in mcq)
    assert set(by_ability) == {"comparison", "temporal", "coreference"}
    wrong = {l: "B: x" if l == "A" else "A: x" for l in "ABCDE"}
    preds = {}
    # multiple choice: comparison all right, temporal all wrong, coreference every other one right
    for i, s in enumerate(s for s in mcq if s.meta["ability"] == "coreference"):
        preds[s.id] = s.answer if i % 2 == 0 else "no letter here"
    for s in mcq:
        if s.meta["ability"] == "comparison":
            preds[s.id] = f"{mcq_letter(s.answer)}: whatever"
        elif s.meta["ability"] == "temporal":
            preds[s.id] = wrong[mcq_letter(s.answer)]
    # open twins: right on comparison only
    for s in samples:
        if s.task == "vqa_closed":
            preds[s.id] = s.answer if s.meta["ability"] == "comparison" else "something else"

    def fake_generate(backbone, batch, max_new_tokens=48, **kw):
        return {"texts": [preds[s.id] for s in batch["samples"]]}

    monkeypatch.setattr(ev, "generate", fake_generate)
    m = ev.evaluate(bb, samples, out_dir=None, batch_size=8, progress=False)
    n_core = by_ability["coreference"]
    assert m["test/ability/comparison/mcq_acc"] == 1.0
    assert m["test/ability/temporal/mcq_acc"] == 0.0
    assert m["test/ability/coreference/mcq_acc"] == pytest.approx(((n_core + 1) // 2) / n_core)
    assert m["test/mcq_acc"] == pytest.approx((by_ability["comparison"] + (n_core + 1) // 2) / len(mcq))
    assert m["test/ability/comparison/closed_acc"] == 1.0 and m["test/ability/temporal/closed_acc"] == 0.0
    assert m["test/ability/comparison/n_studies"] == 0  # mcq samples are not localisation studies
    assert any(k.startswith("test/modality/") and k.endswith("/mcq_acc") for k in m)


def test_localize_train_records_are_the_question_images_in_the_training_split_only(tmp_path):
    kw = dict(n_patients=20, abilities={"comparison": 1, "temporal": 1, "coreference": 1}, seed=6)
    a = generate_multi_image(MultiImageConfig(**kw), tmp_path / "a")
    plain = {s: [json.loads(l) for l in open(a / f"{s}.jsonl")] for s in SPLITS}
    d = generate_multi_image(MultiImageConfig(localize_train=True, **kw), tmp_path / "b")
    both = {s: [json.loads(l) for l in open(d / f"{s}.jsonl")] for s in SPLITS}
    for s in SPLITS:  # the questions (and their images) are unchanged
        assert [r for r in both[s] if r["task"] != "localize"] == plain[s]
    assert all(r["task"] != "localize" for s in ("val", "test") for r in both[s])
    loc = [r for r in both["train"] if r["task"] == "localize"]
    mcq = {r["id"]: r for r in both["train"] if r["task"] == "mcq"}
    assert loc and len(loc) == sum(len(r["images"]) for r in mcq.values() if r["ability"] != "coreference")
    normal = 0
    for r in loc:
        q = mcq[r["study_id"]]
        i = q["images"].index(r["images"][0])
        assert r["boxes"] == q["image_boxes"][i] and r["findings"] == q["image_findings"][i]
        assert r["patient_id"] == q["patient_id"]
        normal += not r["boxes"]
        assert ("No abnormality" in r["answer"]) == (not r["boxes"])
    assert 0 < normal < len(loc)  # new/resolved pairs and transient series give normal images too
    samples = mau_jsonl.read(d / "train.jsonl", root=d)
    assert all(validate_sample(s) == [] for s in samples)


def test_fixed_option_order_letters_name_labels_and_answers_still_match_the_images(tmp_path):
    kw = dict(n_patients=30, abilities={"comparison": 2, "temporal": 1, "coreference": 1}, seed=7)
    raw = _records(generate_multi_image(MultiImageConfig(shuffle_options=False, **kw), tmp_path / "a"))
    comp = [r for r in raw if r["ability"] == "comparison"]
    assert {r["label"] for r in comp} == {"grown", "shrunk", "new", "resolved", "unchanged"}
    for r in raw:
        labels = {"comparison": list(COMPARISON), "temporal": list(TEMPORAL)}.get(r["ability"])
        if labels is None:
            labels = [f"image {i + 1}" for i in range(len(r["images"]))]
            texts = labels
        else:
            texts = [{**COMPARISON, **TEMPORAL}[l] for l in labels]
        assert list(r["options"].values()) == texts  # the same order in every question
        letter = "ABCDE"[labels.index(r["label"])]
        assert r["answer"] == f"{letter}: {texts[labels.index(r['label'])]}" == r["short_answer"]
    for r in comp:  # the label is still what the two images show
        prior, cur = r["image_boxes"]
        assert {
            "new": not prior and cur,
            "resolved": prior and not cur,
            "unchanged": prior == cur and cur,
            "grown": prior and cur and _area(cur[0]) > 2 * _area(prior[0]),
            "shrunk": prior and cur and _area(prior[0]) > 2 * _area(cur[0]),
        }[r["label"]]


def test_vision_warm_up_runs_on_the_experiment_data(mim_setup):
    from unveil.models.vision_pretrain import pretrain_vision_tower

    cfg, dm, bb = mim_setup
    assert cfg.data.synthetic.localize_train and cfg.model.vision_pretrain.steps > 0
    stats = pretrain_vision_tower(bb, dm.data["train"], steps=2, batch_size=4, progress=False)
    assert stats and all(v == v for k, v in stats.items() if k.endswith("cls_loss"))
