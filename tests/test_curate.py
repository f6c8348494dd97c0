"""unveil.curate: the preference-data builders, from the command line and piece by piece.

Every builder runs on the synthetic set and its output is read back by the MAU adapter; the
hallucination rules, the lesion mask and noise, and the weights' agreement loop are checked
on their own; a few DPO steps train on a builder's output.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import unveil.utils.resolvers  # noqa: F401
from unveil.curate.common import CANON, Context, ImageStore
from unveil.curate.hallucination import HallucinationBuilder, is_normal, mirror, negation, wrong_box, wrong_finding
from unveil.curate.lesion_noise import alpha_bar, box_map, lesion_mask, noise_image
from unveil.curate.relevance_weights import LesionContrastScorer, RelevanceWeightBuilder, agreement_score
from unveil.data.adapters import mau_jsonl
from unveil.data.boxes import iou_matrix
from unveil.data.schema import Rejected, Sample
from unveil.judges.base import Judge

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ["nodule", "mass", "cyst"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("curate_cache")


def run_curate(data_root: Path, out: Path, *overrides: str, cache: Path | None = None) -> dict:
    """Compose conf/curate.yaml as the CLI would and run the task function."""
    from hydra import compose, initialize_config_dir

    from unveil.curate.__main__ import curate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "curate",
            overrides=[
                f"data.root={data_root}",
                "data.synthetic=null",
                f"out_dir={out}",
                "progress=false",
                *([f"paths.cache_dir={cache}"] if cache else []),
                *overrides,
            ],
        )
    return curate(cfg)


def read_back(out: Path, split: str = "train") -> list[Sample]:
    return mau_jsonl.read(out / f"{split}.jsonl", root=out)


# --- every builder from the command line / the task function -----------------------------------
def test_cli_hallucination_rules_reads_back(synthetic_dir, tmp_path):
    out = tmp_path / "hal"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "unveil.curate",
            "builder=hallucination",
            "builder.sampler=rules",
            f"data.root={synthetic_dir}",
            "data.synthetic=null",
            f"out_dir={out}",
            "progress=false",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "written" in proc.stdout and "builder=hallucination" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    src = mau_jsonl.read(synthetic_dir / "train.jsonl", root=synthetic_dir)
    got = read_back(out)
    assert summary["splits"]["train"]["read"] == len(src) and summary["splits"]["train"]["written"] == len(got) == len(
        src
    )
    assert summary["splits"]["test"]["mode"] == "passthrough" and len(read_back(out, "test")) > 0
    by_id = {s.id: s for s in src}
    for s in got:
        ref = by_id[s.id.removesuffix("-txt")]
        assert s.target == ref.target and s.images == [
            str(out / Path(p).relative_to(synthetic_dir)) for p in ref.images
        ]
        assert s.rejected is not None and s.rejected.images is None
        assert s.rejected.messages[-1]["content"] != s.target
        assert s.meta["curate_source"] == "rules" and s.meta["curate_rule"] in (
            "wrong_finding",
            "mirror",
            "wrong_box",
            "negation",
        )
    # images are linked into the output, so the directory is self-contained
    assert all(Path(p).is_file() and str(out) in p for s in got for p in s.images)


def test_hallucination_with_model_sampler(synthetic_dir, tmp_path, cache_dir):
    """Tiny untrained model: answers are noise, but every pick is the judge's lowest-scoring sample."""
    out = tmp_path / "halm"
    summary = run_curate(
        synthetic_dir,
        out,
        "builder=hallucination",
        "builder.sampler=model",
        "builder.num_samples=3",
        "builder.max_new_tokens=8",
        "max_samples=4",
        "build_splits=[train]",
        "passthrough=false",
        "num_threads=1",
        cache=cache_dir,
    )
    got = read_back(out)
    assert len(got) == 4 and summary["splits"]["train"]["written"] == 4 and "model" in summary
    assert not (out / "val.jsonl").exists()
    for s in got:
        assert s.rejected.messages[-1]["content"] != s.target
        if s.meta["curate_source"] == "model":
            assert s.meta["curate_judge_score"] < 0.5
        else:
            assert s.meta["curate_rule"] is not None


def test_lesion_noise_builder_local_and_global(synthetic_dir, tmp_path):
    # the ground-truth-box localiser: box-free records get no region (tests/test_localisers.py: attention)
    small = (
        "build_splits=[train]",
        "passthrough=false",
        "max_samples=30",
        "~builder.localiser",
        "+builder.localiser={_target_:unveil.curate.localisers.BoxLocaliser}",
    )
    loc = run_curate(synthetic_dir, tmp_path / "loc", "builder=lesion_noise", *small)
    run_curate(
        synthetic_dir, tmp_path / "glo", "builder=lesion_noise", "builder.mode=global", "builder.noise=replace", *small
    )
    local, whole = read_back(tmp_path / "loc"), read_back(tmp_path / "glo")
    n_normal = sum(1 for s in mau_jsonl.read(synthetic_dir / "train.jsonl", root=synthetic_dir)[:30] if not s.boxes)
    assert (
        loc["splits"]["train"]["skipped/no_lesion_region"] == n_normal > 0
    )  # normal studies: nothing to noise locally
    assert len(whole) == len(local) + n_normal
    for s in local:
        assert s.boxes and s.rejected.messages[-1]["content"] == s.target  # same text on both sides
        real = np.asarray(Image.open(s.images[0]).convert("L"), np.int16)
        noised = np.asarray(Image.open(s.rejected.images[0]).convert("L"), np.int16)
        changed = real != noised
        h, w = real.shape
        near = (
            box_map(
                (h, w),
                [
                    [max(0, b[0] - 0.08), max(0, b[1] - 0.08), min(1, b[2] + 0.08), min(1, b[3] + 0.08)]
                    for b in s.boxes
                ],
            )
            > 0
        )
        assert changed.mean() > 0.5 * box_map((h, w), s.boxes).mean()  # the lesion really is noised
        assert not (changed & ~near).any()  # ... and nothing far from it
    for s in whole:
        real = np.asarray(Image.open(s.images[0]).convert("L"), np.int16)
        noised = np.asarray(Image.open(s.rejected.images[0]).convert("L"), np.int16)
        assert (real != noised).mean() > 0.9
    # records of one study share one noised copy, and a re-run gives the same bytes (deterministic per seed)
    assert len({s.rejected.images[0] for s in local}) == len({s.images[0] for s in local})
    first = {p: Path(p).read_bytes() for s in local for p in s.rejected.images}
    run_curate(synthetic_dir, tmp_path / "loc", "builder=lesion_noise", *small)
    assert all(Path(p).read_bytes() == b for p, b in first.items())
    other = run_curate(synthetic_dir, tmp_path / "seed1", "builder=lesion_noise", *small, "seed=1")
    s1 = read_back(tmp_path / "seed1")
    assert other["splits"]["train"]["written"] == len(local)
    assert Path(s1[0].rejected.images[0]).read_bytes() != Path(local[0].rejected.images[0]).read_bytes()


def _agreed(scores: list[float], tolerance: float = 0.1) -> float:
    """MMedPO's rule, recomputed: the mean of the first two consecutive scores within ``tolerance``,
    else the mean of all."""
    for a, b in zip(scores, scores[1:]):
        if abs(a - b) <= tolerance:
            return (a + b) / 2
    return float(np.mean(scores))


def test_relevance_weights_chain_and_mmedpo(synthetic_dir, tmp_path, cache_dir):
    run_curate(
        synthetic_dir, tmp_path / "hal", "builder=hallucination", "builder.sampler=rules", "build_splits=[train]"
    )
    s = run_curate(
        tmp_path / "hal", tmp_path / "w", "builder=relevance_weights", "data=mau_jsonl", "build_splits=[train]"
    )
    got = read_back(tmp_path / "w")
    assert len(got) == s["splits"]["train"]["written"] > 0
    assert all(2 <= x.meta["weight_rounds"] <= 5 for x in got)
    assert len({round(x.weight, 3) for x in got}) > 3  # weights tell pairs apart
    for x in got:  # each weight is what the agreement rule gives for the judges' recorded scores
        assert x.weight == pytest.approx(_agreed(x.meta["weight_scores"]), abs=1e-3), x.meta
    # a "yes" vs "no" swap shares no words with the reference: the overlap judges agree on 0
    yn = [x for x in got if x.target in ("yes", "no")]
    assert yn and all(x.weight == 0.0 for x in yn)
    # the one-pass MMedPO builder: text (sampled from the model) and visual pairs, weighted; two splits share one model
    m = run_curate(
        synthetic_dir,
        tmp_path / "mm",
        "builder=mmedpo",
        "builder.text.sampler=model",
        "builder.text.num_samples=2",
        "+builder.text.max_new_tokens=6",
        "max_samples=8",
        "num_threads=1",
        cache=cache_dir,
    )
    assert m["splits"]["val"]["written"] > 0 and m["splits"]["test"]["mode"] == "passthrough"
    pairs = read_back(tmp_path / "mm")
    txt = [p for p in pairs if p.id.endswith("-txt")]
    vis = [p for p in pairs if p.id.endswith("-vis")]
    assert txt and vis and len(pairs) == m["splits"]["train"]["written"]
    assert all(p.rejected.images is None for p in txt) and all(
        p.rejected.images and p.rejected.images != p.images for p in vis
    )
    assert np.mean([p.weight for p in vis]) > 0.3  # most lesion evidence is gone at k=500
    assert all(p.weight == pytest.approx(p.meta["weight_visual"]) for p in vis)  # the visual score is the weight
    assert json.loads((tmp_path / "mm" / "summary.json").read_text())["splits"]["train"]["mode"] == "built"


def test_self_training_writes_pairs_and_virtual_user_dialogues(synthetic_dir, tmp_path, cache_dir):
    out = tmp_path / "st"
    summary = run_curate(
        synthetic_dir,
        out,
        "builder=self_training",
        "builder.num_questions=2",
        "builder.max_new_tokens=10",
        "builder.question_max_new_tokens=6",
        "builder.min_margin=-1",
        "max_samples=6",
        "build_splits=[train]",
        "passthrough=false",
        "num_threads=1",
        cache=cache_dir,
    )
    got = read_back(out)
    c = summary["splits"]["train"]
    assert c["images"] >= 2 and c["written"] == len(got) > 0
    assert all(s.rejected.messages[-1]["content"] != s.target and s.task == "vqa_open" for s in got)
    assert all(s.messages[0]["content"].startswith("<image>\n") and not s.boxes for s in got)
    conv = json.loads((out / "train.llava.json").read_text())
    assert conv and all(any(t["from"] == "vuser" for t in d["conversations"]) for d in conv)
    from unveil.data.adapters import llava, stllava_dpo

    dialogues = llava.read(out / "train.llava.json", root=out)
    assert any(m["role"] == "virtual_user" for d in dialogues for m in d.messages)
    dpo = stllava_dpo.read(out / "train.stllava_dpo.json", root=out)
    assert len(dpo) == len(got) and all(d.rejected.messages[-1]["content"] != d.target for d in dpo)


# --- the hallucination rules ----------------------------------------------------------------
BOX_ANSWER = "Abnormality detected. Region [12, 30, 25, 44]: nodule. Region [60, 55, 80, 75]: mass."


def test_wrong_box_moves_every_box_below_iou_half():
    gt = CANON.parse(BOX_ANSWER)
    for seed in range(40):
        out = wrong_box(BOX_ANSWER, np.random.default_rng(seed), VOCAB)
        new = CANON.parse(out)
        assert len(new) == 2 and out.startswith("Abnormality detected. Region [") and ": nodule." in out
        assert iou_matrix(new, gt).max() < 0.5
    assert wrong_box("No abnormality detected.", np.random.default_rng(0), VOCAB) is None


def test_mirror_flips_side_and_skips_central_boxes():
    out = mirror(BOX_ANSWER + " Left lower lobe.", np.random.default_rng(0), VOCAB)
    assert CANON.parse(out) == CANON.parse("[75, 30, 88, 44] [20, 55, 40, 75]") and out.endswith("Right lower lobe.")
    assert mirror("Region [45, 40, 55, 60]: mass.", np.random.default_rng(0), VOCAB) is None  # mirrors onto itself
    assert mirror("Opacity in the left lung.", np.random.default_rng(0), VOCAB) == "Opacity in the right lung."


def test_negation_and_wrong_finding():
    rng = np.random.default_rng(0)
    assert not is_normal(BOX_ANSWER) and is_normal(negation(BOX_ANSWER, rng, VOCAB))
    flipped = negation("No abnormality detected. The study appears normal.", rng, VOCAB)
    assert not is_normal(flipped) and len(CANON.parse(flipped)) == 1 and any(v in flipped for v in VOCAB)
    assert negation("yes", rng, VOCAB) == "no" and negation("No.", rng, VOCAB) == "Yes."
    wf = wrong_finding(BOX_ANSWER, rng, VOCAB)
    assert CANON.parse(wf) == CANON.parse(BOX_ANSWER)  # same boxes, other findings
    import re

    first, second = re.findall(r"\]: (\w+)\.", wf)
    assert first in VOCAB and second in VOCAB and first != "nodule" and second != "mass"
    assert wrong_finding("mass", rng, VOCAB) in ("nodule", "cyst")
    assert wrong_finding("No abnormality detected.", rng, VOCAB) is None


def test_rule_choice_is_deterministic_and_respects_the_rule_list():
    s = Sample(id="a", messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": BOX_ANSWER}])
    b = HallucinationBuilder(sampler="rules")
    assert b.rule_answer(s, 0, VOCAB) == b.rule_answer(s, 0, VOCAB)
    only = HallucinationBuilder(sampler="rules", rules=["wrong_box"])
    rule, ans = only.rule_answer(s, 0, VOCAB)
    assert rule == "wrong_box" and iou_matrix(CANON.parse(ans), CANON.parse(BOX_ANSWER)).max() < 0.5
    assert (
        HallucinationBuilder(sampler="rules", rules=["wrong_box"]).rule_answer(
            Sample(id="n", messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "yes"}]),
            0,
            VOCAB,
        )
        is None
    )


class ScriptedJudge(Judge):
    """Scores by a lookup table of answers; records what it was asked."""

    def __init__(self, table: dict[str, float]):
        self.table, self.calls = table, []

    def score_batch(self, items):
        self.calls.extend(items)
        return [self.table.get(a, float("nan")) for _q, _r, a in items]


def _ctx(tmp_path) -> Context:
    return Context(out_dir=tmp_path, images=ImageStore(tmp_path, tmp_path), seed=0, findings=VOCAB)


def test_model_sampler_picks_the_most_wrong_or_falls_back_to_rules(tmp_path):
    samples = [
        Sample(id=f"s{i}", messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": BOX_ANSWER}])
        for i in range(3)
    ]
    groups = [["close", "far", "middle"], ["good", "fine", ""], [BOX_ANSWER, "unscored", "good"]]
    judge = ScriptedJudge({"close": 0.9, "far": 0.1, "middle": 0.4, "good": 0.8, "fine": 0.7})
    b = HallucinationBuilder(sampler="model", judge=judge, wrong_below=0.5, plausible_only=False)
    b.sample_answers = lambda chunk, ctx: groups[: len(chunk)]
    out = [o.sample for o in b.run(samples, _ctx(tmp_path))]
    assert out[0].rejected.messages[-1]["content"] == "far" and out[0].meta["curate_source"] == "model"
    assert out[1].meta["curate_source"] == "rules"  # nothing clearly wrong (0.7, 0.8): a rule writes one
    assert out[2].meta["curate_source"] == "rules"  # the reference itself and NaN scores are never picked
    assert all(a != BOX_ANSWER and a for _q, _r, a in judge.calls)
    assert b.stats["model_fallback_to_rules"] == 2


def test_model_sampler_rejects_an_invented_box_on_a_normal_study_not_a_broken_fragment(tmp_path):
    from unveil.curate.hallucination import plausible
    from unveil.judges.base import OverlapJudge

    normal = "No abnormality detected. The study appears normal."
    invented = "Abnormality detected. Region [28, 44, 52, 58]: mass."
    assert plausible(invented, normal) and plausible(normal, BOX_ANSWER) and plausible("cyst", "nodule")
    for broken in (
        "81, 41, The stu\ufffd83, 80, 48]: cyst.",
        "A.",
        "Abnormality detected. Region [16, ars normal.",
        "Abnormality detected. Region [12, 30, 25, 44]: nodule",
        "Region 12 detected.",
    ):
        assert not plausible(broken, normal), broken
    assert not plausible("C No abnormality detected. The study appears normal", "no")
    s = Sample(
        id="n0",
        messages=[{"role": "user", "content": "Locate any abnormality."}, {"role": "assistant", "content": normal}],
    )
    b = HallucinationBuilder(sampler="model", judge=OverlapJudge(), wrong_below=0.5)
    b.sample_answers = lambda chunk, ctx: [["A.", "81, 41, The stu", invented, normal]]
    out = [o.sample for o in b.run([s], _ctx(tmp_path))]
    assert out[0].rejected.messages[-1]["content"] == invented and out[0].meta["curate_source"] == "model"
    assert b.stats["model_samples_implausible"] == 2


def test_self_training_chooses_the_judges_better_answer(tmp_path):
    from unveil.curate.self_training import SelfTrainingBuilder

    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(img)
    judge = ScriptedJudge({"worse": 0.2, "better": 0.9, "same": 0.5, "same2": 0.5})
    b = SelfTrainingBuilder(num_questions=3, judge=judge)
    script = iter([[["a description"]], [["Where?", "What?", "Where?"]], [["worse", "better"], ["same", "same2"]]])
    b._generate = lambda ctx, samples, n, sample, max_new: next(script)
    ctx = _ctx(tmp_path)
    outs = list(
        b.run(
            [
                Sample(
                    id="x",
                    images=[str(img)],
                    messages=[{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}],
                )
            ],
            ctx,
        )
    )
    pairs = [o.sample for o in outs if o.sample]
    assert [o.skipped for o in outs if o.skipped] == ["tie"] and b.stats["questions/duplicate"] == 1
    assert len(pairs) == 1 and pairs[0].target == "better" and pairs[0].rejected.messages[-1]["content"] == "worse"
    assert pairs[0].messages[0]["content"] == "<image>\nWhere?" and judge.calls[0][1] == "a description"


# --- lesion mask and noise ------------------------------------------------------------------
def test_lesion_mask_is_blurred_box_thresholded_at_mean_minus_std():
    box = [0.3, 0.4, 0.5, 0.6]
    m = lesion_mask((100, 100), [box], blur_sigma=0.02)
    inside = box_map((100, 100), [box]) > 0
    grown = box_map((100, 100), [[0.25, 0.35, 0.55, 0.65]]) > 0
    assert m[inside].mean() > 0.97 and not (m & ~grown).any() and m.sum() > inside.sum()
    assert not lesion_mask((50, 50), []).any()
    heat = np.zeros((100, 100), np.float32)
    heat[70:80, 10:20] = 1.0
    # a heat map is cut as MMedPO's released code does (tests/test_localisers.py): on a zero background
    # a small blob has mean - std < 0 over the whole image, and the region is every pixel
    assert lesion_mask((100, 100), heatmap=heat).all()


@pytest.mark.parametrize("noise", ["diffusion", "replace"])
def test_noise_changes_pixels_only_inside_the_mask(noise):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = lesion_mask((64, 64), [[0.2, 0.2, 0.4, 0.5]])
    out = noise_image(img, mask, np.random.default_rng(1), noise=noise, step=500)
    changed = (out != img).any(-1)
    assert not changed[~mask].any() and changed[mask].mean() > 0.9
    out2 = noise_image(img, mask, np.random.default_rng(1), noise=noise, step=500)
    assert np.array_equal(out, out2)
    full = noise_image(img, np.ones((64, 64), bool), np.random.default_rng(1), noise=noise)
    assert (full != img).any(-1).mean() > 0.9


def test_diffusion_step_follows_the_linear_beta_schedule():
    betas = np.linspace(1e-4, 0.02, 1000)
    assert math.isclose(alpha_bar(1), 1 - 1e-4) and math.isclose(alpha_bar(500), float(np.prod(1 - betas[:500])))
    grey = np.full((32, 32), 200, np.uint8)  # x = 200/127.5 - 1
    mask = np.ones((32, 32), bool)
    early = noise_image(grey, mask, np.random.default_rng(0), step=10).astype(float)
    late = noise_image(grey, mask, np.random.default_rng(0), step=900).astype(float)
    x = 200 / 127.5 - 1
    assert abs((early.mean() / 127.5 - 1) - math.sqrt(alpha_bar(10)) * x) < 0.02  # E[x*] = sqrt(a_k) x
    assert early.std() < late.std() and abs(late.mean() / 127.5 - 1) < 0.15
    with pytest.raises(ValueError):
        alpha_bar(0)


# --- clinical-relevance weights --------------------------------------------------------------
def _script(scores):
    it = iter(scores)
    calls = []

    def fn():
        calls.append(1)
        return next(it)

    return fn, calls


def test_agreement_stops_early_and_averages_after_five_rounds():
    fn, calls = _script([0.2, 0.25, 0.9])
    w, rounds, scores = agreement_score([fn], tolerance=0.1)
    assert (rounds, len(calls), scores) == (2, 2, [0.2, 0.25]) and math.isclose(w, 0.225)
    fn, calls = _script([0.1, 0.9, 0.1, 0.9, 0.1, 0.9])
    w, rounds, scores = agreement_score([fn], tolerance=0.1, max_rounds=5)
    assert rounds == 5 and len(calls) == 5 and math.isclose(w, 0.42)
    fn, calls = _script([0.1, 0.6, 0.95, 0.9])
    w, rounds, _ = agreement_score([fn], tolerance=0.1)
    assert rounds == 4 and math.isclose(w, 0.925)
    # a failed (NaN) round breaks the chain; all NaN -> NaN
    fn, _ = _script([0.5, float("nan"), 0.55, 0.5])
    w, rounds, _ = agreement_score([fn], tolerance=0.1)
    assert rounds == 4 and math.isclose(w, 0.525)
    fn, _ = _script([float("nan")] * 5)
    assert math.isnan(agreement_score([fn])[0])


def test_weight_builder_cycles_judges_in_turn(tmp_path):
    class Seq(Judge):
        def __init__(self, name, scores):
            self.name, self.scores, self.n = name, list(scores), 0

        def score_batch(self, items):
            self.n += 1
            return [self.scores.pop(0) for _ in items]

    a, b = Seq("a", [0.1, 0.5, 0.9]), Seq("b", [0.8, 0.85])
    pair = Sample(
        id="p",
        messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "mass"}],
        rejected=Rejected(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "cyst"}]),
    )
    builder = RelevanceWeightBuilder(judges=[a, b], tolerance=0.1)
    out = [o.sample for o in builder.run([pair], _ctx(tmp_path))][0]
    # a: 0.1, b: 0.8, a: 0.5, b: 0.85, a: 0.9 -> agreement between 0.85 and 0.9 at round 5
    assert (a.n, b.n) == (3, 2) and math.isclose(out.weight, 0.875) and out.meta["weight_rounds"] == 5
    unpaired = Sample(id="u", messages=pair.messages)
    assert [o.skipped for o in builder.run([unpaired], _ctx(tmp_path))] == ["not_a_preference_pair"]


def test_lesion_contrast_scorer_measures_removed_lesion_evidence(tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    disc = (yy - 32) ** 2 + (xx - 32) ** 2 <= 100  # a bright round lesion inside its box
    box = [22 / 64, 22 / 64, 43 / 64, 43 / 64]
    real = np.clip(rng.normal(80, 5, (64, 64)), 0, 255)
    real[disc] = 200

    def variant(name, img):
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(tmp_path / name)

    variant("real.png", real)
    variant("same.png", real)
    gone, half, patch = real.copy(), real.copy(), real.copy()
    gone[disc] = rng.normal(80, 5, disc.sum())
    half[disc] = 140
    patch[20:45, 20:45] = rng.uniform(0, 255, (25, 25))  # a visible noise patch, no lesion left
    for name, img in [("gone.png", gone), ("half.png", half), ("patch.png", patch)]:
        variant(name, img)
    mask = lesion_mask((64, 64), [box])
    for k in (50, 500):
        variant(f"k{k}.png", noise_image(real.astype(np.uint8), mask, np.random.default_rng(1), step=k))
    scorer = LesionContrastScorer()

    def score(name, boxes=(box,)):
        return scorer(
            Sample(
                id="v",
                images=[str(tmp_path / "real.png")],
                boxes=[list(b) for b in boxes],
                rejected=Rejected(images=[str(tmp_path / name)]),
            )
        )

    assert score("same.png") == 0.0 and score("gone.png") > 0.95 and 0.45 < score("half.png") < 0.55
    assert score("patch.png") > 0.8  # noise that contrasts with the background is not lesion evidence
    # x* = sqrt(a_k) x + ...: about sqrt(a_k) of the pattern is kept (less where pixels clip)
    assert score("k50.png") < 0.1 and score("k500.png") > 0.5  # 1 - sqrt(a_500) = 0.72
    assert math.isnan(score("gone.png", boxes=()))  # a normal study: no lesion to measure


# --- DPO on a builder's output ----------------------------------------------------------------
def test_dpo_trains_on_curated_pairs(synthetic_dir, tmp_path, cache_dir):
    from hydra import compose, initialize_config_dir

    from unveil.train import train

    out = tmp_path / "pairs"
    run_curate(
        synthetic_dir, out, "builder=mmedpo", "builder.text.sampler=rules", "max_samples={train: 24, val: 8, test: 4}"
    )
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "debug=fast",
                "experiment=mmedpo_dpo",
                f"data.root={out}",
                "data.synthetic=null",
                "data.num_workers=0",
                "data.batch_size=4",
                "data.eval_batch_size=8",
                "trainer.max_steps=3",
                "trainer.val_check_interval=3",
                "+trainer.enable_progress_bar=false",
                "eval.enabled=false",
                "logger=none",
                "~callbacks",
                "+trainer.enable_checkpointing=false",
                f"paths.output_dir={tmp_path / 'run'}",
                f"paths.cache_dir={cache_dir}",
            ],
        )
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    assert metrics["train/weights/mean"] > 0.0  # the curated weights reached the loss (0 would mean none did)
    assert (tmp_path / "run" / "backbone" / "config.json").exists()


def test_model_box_text_is_rewritten_to_the_record_grid():
    from unveil.curate.common import to_canonical
    from unveil.data.boxes import get_box_format

    qwen = get_box_format("qwen2vl")
    text = "Abnormality detected. Region <|box_start|>(120,300),(250,440)<|box_end|>: nodule."
    assert to_canonical(text, qwen) == "Abnormality detected. Region [12, 30, 25, 44]: nodule."
    assert to_canonical("Region [12, 30, 25, 44]", get_box_format("int100")) == "Region [12, 30, 25, 44]"
    assert to_canonical("no box here", qwen) == "no box here"
