"""experiments/bench_memory.py: the live-tensor tracker, the width extrapolation, the "before" code paths.

- The tracker counts known tensors exactly (sizes, views, frees, a backward).
- The extrapolation from head_dim 2 and 4 predicts the peak measured at head_dim 8 to the byte, on
  2-layer skeletons of both architectures (small image grid, the real vocabulary and head counts).
- The old code paths re-implemented in the bench compute what ``unveil.models.policy`` computes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import load_experiment


@pytest.fixture(scope="module")
def bm():
    return load_experiment("bench_memory")


def small(bm, key: str):
    return dataclasses.replace(bm.SHAPES[key], layers=2, image_grid=4)


def test_tracker_counts_known_tensors(bm):
    bm.check_tracker()  # raises on a wrong count


PASSES = [
    ("qwen25_vl_7b", "pass_rl_before"),
    ("qwen25_vl_7b", "pass_rl_after"),
    ("qwen25_vl_7b", "pass_head_after"),
    ("qwen25_vl_7b", "pass_vr_before"),
    ("qwen25_vl_7b", "pass_vr_after"),
    ("llava15_7b", "pass_rl_after"),
    ("llava15_7b", "pass_ref_after"),
]


@pytest.mark.parametrize("key,name", PASSES)
def test_extrapolation_predicts_the_peak_at_a_third_width(bm, key, name):
    torch.set_num_threads(1)
    shape, fn = small(bm, key), getattr(bm, name)
    traces = {}
    for hd in (2, 4, 8):
        model = bm.build_model(shape, hd)
        batch = bm.make_head_batch(model, 4, 6) if "head" in name else bm.make_batch(shape, 4, 6, 8)
        traces[hd] = bm.measure(fn, model, batch)
    (h2, _), (h4, _), (h8, _) = (bm.width(shape, hd) for hd in (2, 4, 8))
    got = bm.extrapolate(traces[2], traces[4], h2, h4, h8)
    assert got.affine == 0
    assert got.peak == traces[8].peak > 0


def test_before_paths_compute_what_policy_computes(bm):
    from unveil.models import policy

    torch.set_num_threads(1)
    shape = small(bm, "qwen25_vl_7b")
    model = bm.build_model(shape, 4).float().eval()
    b = bm.make_batch(shape, 4, 6, 8)
    b.inputs["pixel_values"] = b.inputs["pixel_values"].float()
    with torch.no_grad():
        old, old_ent = bm.old_forward_logprobs(model, b.inputs, b.completion_ids, b.completion_mask, with_entropy=True)
        new = policy.completion_logprobs(
            model, b.inputs, b.completion_ids, b.completion_mask, b.group, b.n_images, with_entropy=True
        )
    torch.testing.assert_close(new.logps, old, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new.entropy, old_ent, atol=1e-4, rtol=1e-5)
    old_mass, old_lp = bm.old_vision_relevance_pass(
        model, b.inputs, b.completion_ids, b.completion_mask, b.key_weights
    )
    new_mass, new_lp = policy.key_mass(
        model, b.inputs, b.completion_ids, b.completion_mask, b.key_weights, b.group, b.n_images
    )
    torch.testing.assert_close(new_mass, old_mass, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(new_lp, old_lp, atol=1e-5, rtol=1e-5)
