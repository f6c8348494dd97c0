"""Median decoding of box coordinates (unveil.models.generation.MedianCoordinate)."""

import pytest
import torch

from unveil.data.records import load_records
from unveil.models.generation import MedianCoordinate, grid_token_ids


def test_median_replaces_the_mode_only_where_a_grid_value_wins():
    grid = [10, 11, 12, 13, 14]  # token ids of grid values 0..4; ids 0..9 are other tokens
    p = torch.full((3, 15), 1e-9)
    p[0, [10, 13, 14]] = torch.tensor([0.4, 0.35, 0.25])  # mode 0, median 3 (CDF 0.4, 0.4, 0.4, 0.75)
    p[1, 12] = 1.0  # peaked: median = mode
    p[2, 3], p[2, 14] = 0.6, 0.4  # a text token wins: untouched
    scores = p.log()
    out = MedianCoordinate(grid)(torch.zeros(3, 1, dtype=torch.long), scores)
    assert out.argmax(-1).tolist() == [13, 12, 3]
    assert torch.equal(out[2], scores[2])
    assert out[0].isfinite().all()  # masked with the dtype's min, so no NaN in later softmaxes


class _Tok:
    def __init__(self, split_at: int | None):
        self.split_at = split_at

    def encode(self, text, add_special_tokens=False):
        v = int(text)
        return [100 + v] if self.split_at is None or v < self.split_at else [100 + v // 10, 100 + v % 10]


def test_grid_token_ids_needs_one_token_per_value():
    assert grid_token_ids(_Tok(None), 3) == [100, 101, 102, 103]
    with pytest.raises(ValueError, match="splits '10' into 2 tokens"):
        grid_token_ids(_Tok(10), 100)


def test_bad_coord_decoding_fails_before_training(make_cfg):
    from unveil.train import train

    with pytest.raises(ValueError, match="coord_decoding='mode'"):
        train(make_cfg("debug=fast", "eval.coord_decoding=mode"))


def test_evaluate_with_median_decoding_on_the_tiny_model(make_cfg, tmp_path):

    from unveil.eval.evaluate import evaluate
    from unveil.models.factory import build_backbone

    cfg = make_cfg("debug=fast")
    dm = load_records(cfg.data)
    bb = build_backbone(cfg.model, corpus=dm.corpus(), cache_dir=cfg.paths.cache_dir)
    samples = [s for s in dm.data["test"] if s.task == "localize"][:8]
    a = evaluate(bb, samples, None, progress=False, max_new_tokens=24)
    m = evaluate(bb, samples, None, progress=False, max_new_tokens=24, coord_decoding="median")
    assert a.keys() == m.keys()
    assert ("grid_token_ids", 100) in bb.cache  # looked up once per backbone
    with pytest.raises(ValueError, match="expected one of"):
        evaluate(bb, samples, None, progress=False, coord_decoding="mean")
