"""Boxes through the image handling of real processors (unveil.data.frames).

A red rectangle is drawn at a box on square, portrait and landscape images; the sample is
collated by the tiny model of a real architecture with its real processor class, and the
rectangle is found again in the pixels the model receives. Its edges must be where the answer's
box text says (within a pixel of resampling), and parsing that text must give the original box.

- LLaVA-1.5 (LlavaProcessor + CLIPImageProcessor, shortest-edge resize + centre crop) with
  ``image_aspect: pad``: the box text is in the padded square; without padding (``native``) the
  centre crop moves the lesion away from the text's box, which the same check catches.
- Qwen2.5-VL (Qwen2_5_VLProcessor, smart_resize): absolute pixel boxes on each image's own
  resized size, round-tripping collate -> text -> parse -> normalised.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unveil.utils.resolvers  # noqa: F401
from unveil.data.collate import SFTCollator, backbone_messages
from unveil.data.frames import Frame, answer_frame, expand2square, frame_for, pad_fill
from unveil.data.schema import Sample

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CONF = str(Path(__file__).resolve().parents[1] / "conf")
# (width, height) of the image and the lesion in its pixels: edges on the 0-100 grid of records
SHAPES = {
    "square": ((160, 160), (32, 48, 96, 112)),
    "landscape": ((200, 120), (40, 30, 120, 90)),
    "portrait": ((120, 200), (30, 40, 90, 120)),
}
CORPUS = ["Where is the lesion? Abnormality detected. Region [20, 25, 60, 75]: nodule."] * 20


def build(arch: str, tmp: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from unveil.models.factory import build_backbone

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        c = compose(config_name="train", overrides=[f"model=tiny_{arch}", *overrides])
    bb = build_backbone(c.model, peft=c.peft, corpus=CORPUS, cache_dir=tmp)
    bb.model.eval()
    return bb


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Sample]:
    d = tmp_path_factory.mktemp("frames")
    out = {}
    for name, ((w, h), px) in SHAPES.items():
        img = Image.new("RGB", (w, h), (60, 60, 60))
        img.paste((255, 0, 0), px)
        img.save(d / f"{name}.png")
        box = [px[0] / w, px[1] / h, px[2] / w, px[3] / h]
        grid = ", ".join(str(round(v * 100)) for v in box)
        out[name] = Sample(
            id=name,
            images=[str(d / f"{name}.png")],
            messages=[
                {"role": "user", "content": "<image>\nWhere is the lesion?"},
                {"role": "assistant", "content": f"Abnormality detected. Region [{grid}]: nodule."},
            ],
            boxes=[box],
            findings=["nodule"],
            task="localize",
        )
    return out


def red_edges(rgb: np.ndarray) -> tuple[float, float, float, float]:
    """Sub-pixel edges (x1, y1, x2, y2) of the red rectangle in an HxWx3 [0, 1] image: where its
    profiles through the rectangle's centre cross half the red level (pixel centres at i + 0.5)."""
    red = np.clip(rgb[..., 0] - rgb[..., 1], 0, 1)
    ys, xs = np.nonzero(red > 0.5)
    row, col = red[int(np.median(ys))], red[:, int(np.median(xs))]

    def crossings(p):
        lvl = 0.5 * p.max()
        i = int(np.argmax(p >= lvl))
        j = len(p) - 1 - int(np.argmax(p[::-1] >= lvl))
        lo = i + 0.5 - (p[i] - lvl) / (p[i] - p[i - 1]) if i > 0 else 0.0
        hi = j + 0.5 + (p[j] - lvl) / (p[j] - p[j + 1]) if j + 1 < len(p) else float(len(p))
        return lo, hi

    (x1, x2), (y1, y2) = crossings(row), crossings(col)
    return x1, y1, x2, y2


def model_pixels(bb, batch) -> np.ndarray:
    """The one image of a batch as the vision tower gets it: HxWx3 in [0, 1]."""
    ip = bb.processor.image_processor
    pv = batch["pixel_values"].float()
    if "image_grid_thw" in batch:  # Qwen: undo the patchify (merge blocks of p x p patches)
        _, gh, gw = batch["image_grid_thw"][0].tolist()
        m, p, t = ip.merge_size, ip.patch_size, ip.temporal_patch_size
        x = pv.reshape(gh // m, gw // m, m, m, 3, t, p, p)[:, :, :, :, :, 0]
        pv = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(1, 3, gh * p, gw * p)
    mean, std = torch.tensor(ip.image_mean).view(3, 1, 1), torch.tensor(ip.image_std).view(3, 1, 1)
    return (pv[0] * std + mean).permute(1, 2, 0).clamp(0, 1).numpy()


def text_box_pixels(bb, s: Sample) -> tuple[np.ndarray, Frame]:
    """The answer's box as the model reads it, in pixels of the image the model sees."""
    frame = answer_frame(bb, s)
    answer = backbone_messages(bb, s)[-1]["content"]
    (p,) = bb.box_format.parse_spans(answer, frame.size)
    return p.box, frame


def test_pad_frame_is_llavas_expand2square_and_inverts():
    """The frame's offsets are where expand2square pastes the image, and HF's own
    LlavaImageProcessor(do_pad=True) sees the same pixels as our padding before a plain processor."""
    from transformers import CLIPImageProcessor, LlavaImageProcessor

    class B:  # the parts of a Backbone the frame reads
        box_format = type("F", (), {"needs_image_size": False, "name": "int100"})()
        extra = {"image_aspect": "pad"}
        processor = type("P", (), {"image_processor": CLIPImageProcessor()})()

    for (w, h), px in SHAPES.values():
        img = Image.new("RGB", (w, h), (60, 60, 60))
        img.paste((255, 0, 0), px)
        sq = np.asarray(expand2square(img, pad_fill(B())))
        f = frame_for(B(), w, h)
        box = (px[0] / w, px[1] / h, px[2] / w, px[3] / h)
        x1, y1, x2, y2 = (round(v * max(w, h)) for v in f.to_model(box))
        assert (sq[y1:y2, x1:x2] == (255, 0, 0)).all() and (sq[..., 1] == 0).sum() == (x2 - x1) * (y2 - y1)
        assert np.allclose(f.to_original(f.to_model(box)), box)
        kw = dict(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
        ours = CLIPImageProcessor(**kw)(expand2square(img, pad_fill(B())))
        hf = LlavaImageProcessor(do_pad=True, **kw)(img)
        torch.testing.assert_close(ours["pixel_values"], hf["pixel_values"], atol=0.02, rtol=0)
    # a box drawn entirely on the padding is no box of the image
    assert frame_for(B(), 200, 100).to_original((0.1, 0.0, 0.5, 0.2)) is None


@pytest.mark.parametrize("shape", list(SHAPES))
def test_llava_pad_keeps_the_box_exact_through_the_processor(studies, tmp_path, shape):
    bb = build("llava15", tmp_path)
    assert bb.extra["image_aspect"] == "pad"  # the default for the LLaVA family
    s = studies[shape]
    batch = SFTCollator(bb)([s])
    pix = model_pixels(bb, batch)
    side = pix.shape[0]
    box, frame = text_box_pixels(bb, s)
    assert np.allclose(red_edges(pix), np.asarray(box) * side, atol=1.0), (red_edges(pix), np.asarray(box) * side)
    # parsed back, the text is the original box (0-100 grid, mapped through the square)
    back = frame.to_original(box)
    assert np.allclose(back, s.boxes[0], atol=0.5 / 100 * max(SHAPES[shape][0]) / min(SHAPES[shape][0]) + 1e-9)
    if shape != "square":  # the check can fail: the processor's own centre crop cuts and shifts the lesion
        native = build("llava15", tmp_path, "model.image_aspect=native")
        pix = model_pixels(native, SFTCollator(native)([s]))
        nbox, _ = text_box_pixels(native, s)
        assert np.abs(np.asarray(red_edges(pix)) - np.asarray(nbox) * side).max() > 3


@pytest.mark.parametrize("shape", list(SHAPES))
def test_qwen25_absolute_boxes_round_trip_on_each_images_own_grid(studies, tmp_path, shape):
    bb = build("qwen25_vl", tmp_path, "model.spec.image_size=112")
    s = studies[shape]
    batch = SFTCollator(bb)([s])
    box, frame = text_box_pixels(bb, s)
    _, gh, gw = batch["image_grid_thw"][0].tolist()
    patch = bb.processor.image_processor.patch_size
    W, H = frame.size
    assert (gw * patch, gh * patch) == (W, H)  # the grid the processor produced for this image
    assert (W > H) == (shape == "landscape") and (H > W) == (shape == "portrait")
    # the text is the box in pixels of that grid, rounded
    answer = backbone_messages(bb, s)[-1]["content"]
    gt = np.asarray(s.boxes[0]) * [W, H, W, H]
    assert f"[{', '.join(str(int(round(v))) for v in gt)}]" in answer
    # and the pixels the model gets have the lesion there
    px = np.asarray(box) * [W, H, W, H]
    assert np.allclose(red_edges(model_pixels(bb, batch)), px, atol=1.0), (red_edges(model_pixels(bb, batch)), px)
    # parse -> normalised: the original box, to half a resized pixel (the text's rounding)
    assert np.allclose(box, s.boxes[0], atol=0.5 / min(W, H) + 1e-9)
    # a fixed square grid (the old contract) puts a non-square image's box elsewhere
    if shape != "square":
        side = int(np.sqrt(W * H))
        wrong = bb.box_format.parse(answer, (side, side))[0]
        assert not np.allclose(wrong, s.boxes[0], atol=0.5 / min(W, H) + 1e-9)


@pytest.mark.parametrize("arch", ["llava15", "qwen25_vl"])
def test_evaluation_reports_boxes_in_the_original_image(studies, tmp_path, monkeypatch, arch):
    """A model that answers the reference in its own frame scores IoU ~1 on every aspect ratio,
    and predictions.jsonl holds the original-image box."""
    import json

    import unveil.eval.evaluate as ev

    bb = build(arch, tmp_path)
    samples = list(studies.values())
    monkeypatch.setattr(
        ev,
        "generate",
        lambda b, batch, **kw: {"texts": [backbone_messages(b, s)[-1]["content"] for s in batch["samples"]]},
    )
    metrics = ev.evaluate(bb, samples, out_dir=tmp_path / "ev", progress=False)
    assert metrics["test/iou"] > 0.95, metrics
    for rec, s in zip(map(json.loads, (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()), samples):
        assert np.allclose(rec["pred_boxes"][0], s.boxes[0], atol=0.02), (rec["pred_boxes"], s.boxes)


def test_vision_relevance_marks_the_boxs_patches_in_the_padded_square(studies, tmp_path):
    from unveil.data.collate import PromptCollator
    from unveil.rewards.base import Rollout
    from unveil.rewards.vision_relevance import box_key_weights, image_grids, patch_mask

    bb = build("llava15", tmp_path)
    s = studies["landscape"]
    s = Sample(**{**s.__dict__, "boxes": [[0.0, 0.0, 0.5, 0.25]]})  # the top strip: rows shift under padding
    batch = PromptCollator(bb)([s])
    rb = Rollout(
        samples=[s],
        texts=["x"],
        group=torch.tensor([0]),
        completion_ids=torch.ones(1, 2, dtype=torch.long),
        completion_mask=torch.ones(1, 2, dtype=torch.long),
        inputs=batch,
    )
    w, ok = box_key_weights(bb, rb)
    ((pos, gh, gw),) = image_grids(bb, batch["input_ids"], [s])[0]
    padded = patch_mask([answer_frame(bb, s).to_model(s.boxes[0])], gh, gw)
    assert ok == [True] and torch.equal(w[0, pos] > 0, padded)
    assert not torch.equal(padded, patch_mask(s.boxes, gh, gw))  # unmapped, other patches
