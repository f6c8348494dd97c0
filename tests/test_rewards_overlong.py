"""The overlong head (DAPO's soft length penalty): exact values on the ramp, lengths from the
completion mask or, for text-only batches, the tokenizer; any text scores in [-1, 0]; the yaml
ties ``max_len`` to the stage's generation limit."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose
from hypothesis import given, settings
from hypothesis import strategies as st

from unveil.data.schema import Sample
from unveil.rewards.base import Rollout
from unveil.rewards.composite import build_composite
from unveil.rewards.overlong import OverlongReward


class _WordTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text.split())))}


class _BB:
    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer


def _batch(completions, mask_lengths=None, tasks=None):
    n = len(completions)
    samples = [Sample(f"s{i}", messages=[], task=(tasks or ["localize"] * n)[i]) for i in range(n)]
    mask = None
    if mask_lengths is not None:
        width = max(mask_lengths + [1])
        mask = torch.tensor([[1] * k + [0] * (width - k) for k in mask_lengths])
    return Rollout(
        samples=samples,
        texts=list(completions),
        group=torch.zeros(n, dtype=torch.long),
        completion_mask=mask,
    )


@pytest.mark.parametrize("n,expected", [(0, 0.0), (6, 0.0), (7, -0.25), (8, -0.5), (9, -0.75), (10, -1.0), (11, -1.0)])
def test_ramp_by_hand(n, expected):
    assert OverlongReward(max_len=10, cache=4).penalty(n) == pytest.approx(expected)


def test_lengths_come_from_the_completion_mask_and_tasks_filter():
    head = OverlongReward(max_len=10, cache=4, tasks=["localize"])
    r = head(_batch(["a", "b", "c"], mask_lengths=[3, 10, 8], tasks=["localize", "localize", "vqa_closed"]))
    assert r[:2].tolist() == [0.0, -1.0] and math.isnan(r[2])


def test_text_only_batches_count_with_the_tokenizer_and_never_raise_without_one():
    head = OverlongReward(max_len=10, cache=4).bind(_BB(_WordTokenizer()))
    assert head(_batch(["one two three", " ".join(["w"] * 9)])).tolist() == [0.0, -0.75]
    head.bind(_BB(None))
    assert torch.isnan(head(_batch(["one two"]))).all()  # nothing to count with: NaN, not an exception


@settings(max_examples=40, deadline=None)
@given(
    texts=st.lists(st.one_of(st.text(max_size=200), st.none(), st.integers()), min_size=1, max_size=6),
    max_len=st.integers(1, 64),
    data=st.data(),
)
def test_any_text_scores_in_minus_one_to_zero(texts, max_len, data):
    cache = data.draw(st.integers(1, max_len))
    r = OverlongReward(max_len=max_len, cache=cache).bind(_BB(_WordTokenizer()))(_batch(texts))
    assert r.shape == (len(texts),) and torch.isfinite(r).all() and ((r >= -1) & (r <= 0)).all()


def test_bad_settings_fail_at_build_time():
    with pytest.raises(ValueError, match="cache"):
        OverlongReward(max_len=8, cache=0)
    with pytest.raises(ValueError, match="cache"):
        OverlongReward(max_len=8, cache=9)


def test_yaml_composes_with_a_preset_and_follows_the_generation_limit():
    cfg = compose(["debug=fast", "stage=grpo", "reward=[umed,overlong]", "stage.max_new_tokens=24"])
    comp = build_composite(cfg.reward, backbone=None, vocab=["nodule"])
    assert {h.name for h in comp.heads} == {"relevance", "localization", "vision_relevance", "overlong"}
    head = next(h for h in comp.heads if h.name == "overlong")
    assert (head.norm, head.weight) == ("none", 1.0) and head.head.max_len == 24 and head.head.cache == 16
