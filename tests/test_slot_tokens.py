"""Slot tokens (``model.spec.slot_tokens``): K image tokens after the patches, slot k pooling box k
in reading order. The layout the processor, the model and the vision-relevance reward agree on;
the warm-up targets; a save / load round trip, as ``model.init_from`` does it."""

from __future__ import annotations

import pytest
import torch
from conftest import CONF
from omegaconf import OmegaConf

from unveil.data.collate import PromptCollator
from unveil.data.schema import Sample
from unveil.models.vision_pretrain import slot_targets
from unveil.rewards.vision_relevance import image_grids

SMALL = {
    "image_size": 32,
    "vision_hidden": 32,
    "hidden": 64,
    "layers": 1,
    "heads": 2,
    "intermediate": 128,
    "vocab_size": 320,
}


def _cfg(slots: int, **extra):
    cfg = OmegaConf.load(CONF / "model" / "tiny_llava.yaml")
    cfg.spec = OmegaConf.merge(cfg.spec, SMALL, {"slot_tokens": slots})
    for k, v in extra.items():
        OmegaConf.update(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def corpus(synthetic_dir):
    from unveil.data.adapters import mau_jsonl

    train = mau_jsonl.read(synthetic_dir / "train.jsonl")
    return train, [m["content"] for s in train for m in s.messages]


def _build(corpus, tmp_path, slots: int, **extra):
    from unveil.models.factory import build_backbone

    return build_backbone(_cfg(slots, **extra), corpus=corpus[1], cache_dir=tmp_path / "cache")


def test_processor_model_and_reward_agree_on_the_layout(corpus, tmp_path):
    bb = _build(corpus, tmp_path, slots=2)
    grid = 32 // 8
    abnormal = next(s for s in corpus[0] if s.boxes and s.task == "localize")
    two = Sample(
        "two",
        images=[abnormal.images[0]] * 2,
        messages=[
            {"role": "user", "content": "<image>\n<image>\nCompare the two studies."},
            {"role": "assistant", "content": "x"},
        ],
    )
    batch = PromptCollator(bb)([abnormal, two])
    ids = batch["input_ids"]
    tid = bb.model.config.image_token_index
    assert (ids[0] == tid).sum() == grid * grid + 2 and (ids[1] == tid).sum() == 2 * (grid * grid + 2)
    with torch.no_grad():
        feats = bb.model.model.vision_tower(batch["pixel_values"][:1]).last_hidden_state
        # LLaVA raises if the image tokens and the image features differ in number
        out = bb.model(**{k: v for k, v in batch.items() if torch.is_tensor(v)})
    assert feats.shape[1] == grid * grid + 2
    assert torch.isfinite(out.logits).all()
    # the reward's patch map covers the patches of each image and skips the slots after them
    lay0, lay1 = image_grids(bb, ids, [abnormal, two])
    run0, run1 = (ids[0] == tid).nonzero().flatten(), (ids[1] == tid).nonzero().flatten()
    (pos,) = [p for p, _, _ in lay0]
    assert pos.tolist() == run0[:16].tolist()
    assert [p.tolist() for p, _, _ in lay1] == [run1[:16].tolist(), run1[18:34].tolist()]


def test_slot_targets_follow_reading_order():
    right, left, other = [0.6, 0.1, 0.9, 0.4], [0.1, 0.5, 0.3, 0.7], [0.0, 0.0, 0.2, 0.2]
    s2 = Sample("a", images=["x"], messages=[], boxes=[right, left], findings=["mass", "cyst"])
    s1 = Sample(
        "b", images=["x", "y"], messages=[], boxes=[other, right], findings=["mass", "mass"], box_images=[1, 0]
    )
    normal = Sample("c", images=["x"], messages=[], boxes=[], findings=[])
    mask, boxes, present = slot_targets([s2, s1, normal], grid=4, slots=2)
    assert present.tolist() == [[True, True], [True, False], [False, False]]
    torch.testing.assert_close(boxes[0], torch.tensor([left, right]))  # left to right, as the answers list them
    assert boxes[1, 0].tolist() == pytest.approx(right)  # a box on the second image is not this image's
    # `left` covers patch centres x=0.125 (col 0) and y=0.625 (row 2): patch 8 of the 4 x 4 grid
    assert mask[0, 0].nonzero().flatten().tolist() == [8]
    assert not mask[2].any()


def test_slot_tokens_survive_save_and_load(corpus, tmp_path):
    from unveil.models.factory import build_backbone

    bb = _build(corpus, tmp_path, slots=3)
    bb.model.save_pretrained(tmp_path / "saved")
    bb.processor.save_pretrained(tmp_path / "saved")
    loaded = build_backbone(_cfg(0, init_from=str(tmp_path / "saved")), corpus=corpus[1], cache_dir=tmp_path / "cache")
    assert loaded.model.config.vision_config.slot_tokens == 3
    sample = next(s for s in corpus[0] if s.boxes)
    a, b = PromptCollator(bb)([sample]), PromptCollator(loaded)([sample])
    assert torch.equal(a["input_ids"], b["input_ids"])
    with torch.no_grad():
        la = bb.model(**{k: v for k, v in a.items() if torch.is_tensor(v)}).logits
        lb = loaded.model(**{k: v for k, v in b.items() if torch.is_tensor(v)}).logits
    torch.testing.assert_close(la, lb)


def test_slot_tokens_need_the_conv_tower(corpus, tmp_path):
    with pytest.raises(ValueError, match="slot_tokens needs model.spec.vision=conv"):
        _build(corpus, tmp_path, slots=2, **{"spec.vision": "siglip"})


def test_warmup_trains_every_slot(corpus, tmp_path):
    """A few warm-up steps move each slot's own objectness head (its loss reaches it) and report a
    per-slot IoU; without slots the default warm-up is unchanged."""
    from unveil.models.vision_pretrain import pretrain_vision_tower

    train = corpus[0]
    bb = _build(corpus, tmp_path, slots=2)
    tower = bb.model.model.vision_tower
    before = tower.slot_objectness.weight.detach().clone()
    stats = pretrain_vision_tower(bb, train, steps=3, lr=1e-3, batch_size=8, progress=False, val_samples=train)
    after = tower.slot_objectness.weight.detach()
    assert not torch.equal(before[0], after[0]) and not torch.equal(before[1], after[1])
    assert 0.0 <= stats["vision_warmup/val_slot1_iou"] <= 1.0
    assert "vision_warmup/val_slot2_iou" in stats
    plain = pretrain_vision_tower(
        _build(corpus, tmp_path, slots=0), train, steps=1, batch_size=8, progress=False, val_samples=train
    )
    assert not any(k.startswith("vision_warmup/val_slot") for k in plain)
