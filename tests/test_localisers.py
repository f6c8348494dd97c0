"""MMedPO's visual pairs without boxes: the localisers of curate/localisers.py.

- the heat-map cut is MMedPO's released one (OpenCV's 15 x 15 Gaussian blur, > mean - std over the
  whole image), checked against an independent re-implementation of OpenCV's kernel and borders;
- the attention localiser reads the policy's attention per patch through key_mass (its K columns
  add up to the one-column mass the vision-relevance reward reads) and puts it back on the
  original pixels through the image's frame;
- builder=mmedpo makes visual pairs for box-free VQA records with the attention localiser, weighted
  by its confidence;
- how well the attention localiser finds the lesion is measured by experiments/localiser_iou.py
  (results in experiments/results/localiser_iou.md), not asserted here: it does not reach issue
  19's bar on the tiny model.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import unveil.utils.resolvers  # noqa: F401
from unveil.curate.localisers import heat_confidence, heat_on_images, official_region
from unveil.data.adapters import mau_jsonl

ROOT = Path(__file__).resolve().parents[1]


def opencv_blur_15(m: np.ndarray) -> np.ndarray:
    """cv2.GaussianBlur(m, (15, 15), 0) written out: sigma = 0.3 * ((15 - 1) * 0.5 - 1) + 0.8, the
    sampled kernel normalised to 1, separable, BORDER_REFLECT_101 (numpy's 'reflect')."""
    sigma = 0.3 * ((15 - 1) * 0.5 - 1) + 0.8
    k = np.exp(-((np.arange(15) - 7) ** 2) / (2 * sigma**2))
    k /= k.sum()
    p = np.pad(m.astype(np.float64), 7, mode="reflect")
    rows = np.stack([np.convolve(r, k, mode="valid") for r in p])
    return np.stack([np.convolve(c, k, mode="valid") for c in rows.T]).T


def test_official_cut_is_opencvs_15x15_blur_then_mean_minus_std_over_the_image():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:90, 0:120]
    heat = np.exp(-((yy - 30) ** 2 + (xx - 80) ** 2) / 3000.0) + 0.05 * rng.random((90, 120))  # a broad blob
    ref = opencv_blur_15(heat)
    thr = ref.mean() - ref.std()
    got = official_region(heat.astype(np.float32))
    sure = np.abs(ref - thr) > 1e-4  # float32 vs float64 only disagree at the threshold itself
    assert got.shape == heat.shape and np.array_equal(got[sure], (ref > thr)[sure])
    assert 0.3 < got.mean() < 1.0 and got[30, 80] and not got[89, 0]  # a broad map: the blob and more
    # a peaked map on a zero background: mean - std < 0 selects every pixel (what the released rule does)
    peak = np.zeros((90, 120), np.float32)
    peak[20:30, 70:90] = 1.0
    assert official_region(peak).all() and heat_confidence(peak, official_region(peak)) == 0.0


def test_heat_confidence_is_the_regions_share_above_its_area():
    heat = np.zeros((10, 10))
    heat[:5] = 1.0  # all heat in the top half
    top = np.zeros((10, 10), bool)
    top[:5] = True
    assert heat_confidence(heat, top) == 1.0
    assert heat_confidence(np.ones((10, 10)), top) == 0.0  # uniform heat: the region holds its area's share
    half = np.zeros((10, 10), bool)
    half[:, :5] = True
    assert heat_confidence(heat, half) == 0.0  # half the heat in half the image


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from hydra import compose, initialize_config_dir

    from unveil.models.factory import build_backbone

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        c = compose(config_name="train", overrides=["model=tiny_llava15"])
    bb = build_backbone(
        c.model, corpus=["What is shown? A mass at the top."] * 20, cache_dir=tmp_path_factory.mktemp("t")
    )
    return bb.model.eval() and bb


def test_per_patch_attention_adds_up_to_the_rewards_mass_and_lands_on_the_original_pixels(llava, tmp_path):
    from PIL import Image

    from unveil.data.collate import PromptCollator
    from unveil.data.schema import Sample
    from unveil.models.inputs import model_inputs
    from unveil.models.policy import key_mass
    from unveil.rewards.vision_relevance import image_grids

    Image.new("RGB", (200, 120), (90, 90, 90)).save(tmp_path / "a.png")
    s = Sample(
        id="a",
        images=[str(tmp_path / "a.png")],
        messages=[{"role": "user", "content": "<image>\nWhat is shown?"}, {"role": "assistant", "content": "A mass."}],
        task="vqa_open",
    )
    batch = PromptCollator(llava)([s])
    ((pos, gh, gw),) = image_grids(llava, batch["input_ids"], [s])[0]
    ids = torch.tensor([[5, 6, 7]])
    n, p = batch["input_ids"].shape
    one = torch.zeros(n, p + 3)
    one[0, pos] = 1.0
    cols = torch.zeros(n, p + 3, gh * gw)
    cols[0, pos, torch.arange(gh * gw)] = 1.0
    inputs = model_inputs(dict(batch))
    m1, _ = key_mass(llava.model, inputs, ids, torch.ones_like(ids), one)
    mk, _ = key_mass(llava.model, inputs, ids, torch.ones_like(ids), cols)
    assert mk.shape == (*m1.shape, gh * gw)
    torch.testing.assert_close(mk.sum(-1), m1, atol=1e-6, rtol=1e-5)
    # a patch grid hot at one patch of the padded square -> hot where that patch lies on the original image
    g = np.zeros((gh, gw), np.float32)
    g[1, 2] = 1.0  # row 1, column 2 of the 4 x 4 square: y in [0.25, 0.5], x in [0.5, 0.75]
    (loc,) = heat_on_images(llava, s, [(120, 200)], [g])
    y, x = np.unravel_index(np.argmax(loc.heat), loc.heat.shape)
    # the square is 200 px, the image sits at rows 40..160 of it: patch centre (x 125, y 75) -> (125, 35)
    assert abs(x - 125) <= 2 and abs(y - 35) <= 2, (x, y)


def test_mmedpo_builds_visual_pairs_for_box_free_vqa_records_with_the_attention_localiser(synthetic_dir, tmp_path):
    from conftest import load_experiment
    from test_curate import read_back, run_curate

    exp = load_experiment("localiser_iou")
    box_free_vqa, grey = exp.box_free_vqa, exp.grey

    data = tmp_path / "vqa"
    gt = box_free_vqa(synthetic_dir, data, "train", 6)
    assert gt and all(not s.boxes for s in mau_jsonl.read(data / "train.jsonl", root=data))
    out = tmp_path / "pairs"
    summary = run_curate(
        data, out, "builder=mmedpo", "builder.text.sampler=rules", "build_splits=[train]", "passthrough=false"
    )
    visual = [s for s in read_back(out) if s.id.endswith("-vis")]
    assert len(visual) == len(gt) and summary["splits"]["train"]["lesion_noise/localiser/attention"] == len(gt)
    for s in visual:
        assert s.meta["curate_localiser"] == "attention" and s.rejected.messages[-1]["content"] == s.target
        conf = s.meta["curate_localiser_confidence"]
        assert 0.0 <= conf <= 1.0 and s.meta["weight_visual_source"] == "localiser"
        assert math.isclose(s.weight, conf, abs_tol=1e-6)  # the pair's weight is the localiser's confidence
        real = np.asarray(grey(s.images[0]), np.int16)
        noised = np.asarray(grey(s.rejected.images[0]), np.int16)
        changed = (real != noised).mean()
        frac = s.meta["curate_mask_fraction"]
        assert 0.5 * frac < changed <= frac  # noise in the region only
