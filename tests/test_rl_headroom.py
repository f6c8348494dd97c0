"""experiments/rl_headroom.py: per-study IoU as unveil.eval scores it, and the best-of-G bounds."""

import numpy as np
import pytest
from conftest import compose, load_experiment

from unveil.data.boxes import IntGridFormat
from unveil.data.records import load_records
from unveil.data.schema import Sample


@pytest.fixture(scope="module")
def hr():
    return load_experiment("rl_headroom")


def test_study_iou_hand_computed(hr):
    s = Sample(
        id="x",
        task="localize",
        messages=[{"role": "user", "content": "q"}],
        boxes=[[0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.8, 0.8]],
        findings=["mass", "cyst"],
    )
    f, v = IntGridFormat(100), ["mass", "cyst"]
    assert hr.study_iou(
        "Abnormality detected. Region [10, 10, 30, 30]: mass. Region [60, 60, 80, 80]: cyst.", s, f, v
    ) == pytest.approx(1)
    # one of two found, the other missed: the mean over GT boxes
    assert hr.study_iou("Abnormality detected. Region [60, 60, 80, 80]: cyst.", s, f, v) == pytest.approx(0.5)
    assert hr.study_iou("garbled [[", s, f, v) == 0.0


def test_headroom_bounds_on_the_tiny_model(hr):
    import torch

    from unveil.models.factory import build_backbone

    c = compose(["debug=fast"])
    dm = load_records(c.data)
    bb = build_backbone(c.model, peft=c.peft, corpus=dm.corpus(), cache_dir=c.paths.cache_dir)
    samples = [s for s in dm.data["test"] if s.task == "localize" and s.boxes][:6]
    assert samples
    torch.manual_seed(0)
    res = hr.headroom(bb, samples, dm.findings(), G=3, temperature=1.0, max_new_tokens=24)
    assert sum(len(r["greedy"]) for r in res.values()) == len(samples)
    assert set(res) <= {1, 2, 3}
    for r in res.values():
        g, m, b = (np.array(r[k]) for k in ("greedy", "sampled", "best"))
        assert ((0 <= g) & (g <= 1)).all() and (b >= m - 1e-9).all()  # the best of G is never below their mean
