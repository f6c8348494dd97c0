"""The vision warm-up teaches the tower where the lesion is: the pooled token's decoded box
beats the best constant box on held-out studies."""

import numpy as np
import pytest
from conftest import CONF

from unveil.data.boxes import iou_matrix


@pytest.mark.slow
def test_warmup_pooled_box_beats_a_constant_box(tmp_path):
    from omegaconf import OmegaConf

    from unveil.data.adapters import mau_jsonl
    from unveil.data.synthetic import SyntheticConfig, generate
    from unveil.models.factory import build_backbone
    from unveil.models.vision_pretrain import pretrain_vision_tower

    d = generate(SyntheticConfig(n_patients=300, seed=5, closed_questions=False), tmp_path / "data", progress=False)
    train = mau_jsonl.read(d / "train.jsonl")
    held_out = mau_jsonl.read(d / "val.jsonl") + mau_jsonl.read(d / "test.jsonl")
    bb = build_backbone(
        OmegaConf.load(CONF / "model" / "tiny_llava.yaml"),
        corpus=[m["content"] for s in train for m in s.messages],
        cache_dir=tmp_path / "cache",
    )

    def first(s):
        return min(s.boxes, key=lambda b: (b[0], b[1]))

    mean_box = np.mean([first(s) for s in train if s.boxes], 0)
    constant = np.mean([iou_matrix([mean_box], [first(s)])[0, 0] for s in held_out if s.boxes])
    stats = pretrain_vision_tower(bb, train, steps=150, lr=4e-3, batch_size=16, progress=False, val_samples=held_out)
    assert stats["vision_warmup/val_pool_iou"] > constant + 0.1, (stats, constant)
