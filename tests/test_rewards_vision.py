"""Vision-relevance heads on a tiny LLaVA built in code (SigLIP 32 px / patch 8 -> 4 x 4 grid + Llama).

Checks: shape and finiteness; NaN for normal studies and other tasks; 0 when no finding is named;
the value equals an independent recomputation from an eager forward pass; with hand-made
attentions the head returns exactly the mass put inside the box; the attention implementation is
restored; one forward pass is shared between the heads; the counterfactual gap and its masking.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from unveil.data.boxes import get_box_format
from unveil.data.collate import PromptCollator
from unveil.data.schema import Sample
from unveil.models.factory import Backbone
from unveil.models.tiny_llava import TinyLlavaSpec, build_model, build_processor
from unveil.rewards.base import Rollout
from unveil.rewards.composite import build_composite
from unveil.rewards.vision_relevance import (
    FORWARD_KEY,
    VisionCounterfactualReward,
    VisionRelevanceReward,
    finding_pattern,
    finding_token_mask,
    image_grids,
    mask_pixel_values,
    patch_mask,
)

VOCAB = ["cyst", "mass", "nodule"]
BOX = [0.5, 0.5, 1.0, 1.0]  # bottom-right quarter: patches (2,2) (2,3) (3,2) (3,3) of the 4 x 4 grid
BOX_PATCHES = [10, 11, 14, 15]
GOOD = "Abnormality detected. Region [50, 50, 100, 100]: nodule."


@pytest.fixture(scope="module")
def bb():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from unveil.models.tokenizer import SPECIAL, TINY_CHAT_TEMPLATE

    corpus = [
        GOOD,
        "No abnormality detected. The study appears normal.",
        "Is there an abnormality in this CT image?",
        "Locate and diagnose it. mass cyst nodules yes no Region",
    ] * 4
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<pad>", "<unk>", "<s>", "</s>", "<image>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens={"image_token": "<image>"}, **SPECIAL)
    fast.chat_template = TINY_CHAT_TEMPLATE
    spec = TinyLlavaSpec(
        image_size=32,
        patch_size=8,
        vision_hidden=32,
        vision_layers=1,
        vision_heads=2,
        hidden=64,
        layers=2,
        heads=2,
        intermediate=128,
        vocab_size=320,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend on a shared CPU
    try:
        yield Backbone(build_model(fast, spec, seed=0), build_processor(fast, spec), get_box_format("int100"), "tiny")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(p)
    return str(p)


def _sample(image, boxes=(BOX,), findings=("nodule",), task="localize", sid="s"):
    return Sample(
        sid,
        images=[image],
        messages=[
            {"role": "user", "content": "<image>\nIs there an abnormality in this CT image?"},
            {"role": "assistant", "content": GOOD if boxes else "No abnormality detected."},
        ],
        boxes=[list(b) for b in boxes],
        findings=list(findings),
        task=task,
    )


def make_batch(bb, samples, completions, with_ids=True):
    """Prompt inputs from the real collator (left-padded), completions tokenised and right-padded."""
    pi = {k: v for k, v in PromptCollator(bb)(samples).items() if torch.is_tensor(v)}
    tok = bb.tokenizer
    ids = mask = None
    if with_ids:
        enc = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in completions]
        t = max(len(e) for e in enc)
        ids = torch.full((len(enc), t), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(enc), t), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, : len(e)], mask[i, : len(e)] = torch.tensor(e), 1
    return Rollout(
        samples=list(samples),
        texts=list(completions),
        group=torch.arange(len(samples)) // 2,
        completion_ids=ids,
        completion_mask=mask,
        inputs=pi,
    )


def test_layout_and_patches(bb, image):
    assert patch_mask([BOX], 4, 4).nonzero().flatten().tolist() == BOX_PATCHES
    assert patch_mask([[0.0, 0.0, 0.1, 0.1]], 4, 4).nonzero().flatten().tolist() == [0]  # smaller than a patch
    assert patch_mask([[0.0, 0.0, 1.0, 1.0]], 4, 4).all()
    b = make_batch(bb, [_sample(image)], [GOOD])
    ids = b.inputs["input_ids"]
    ((pos, gh, gw),) = image_grids(bb, ids, b.samples)[0]
    assert (gh, gw) == (4, 4) and pos.numel() == 16 and (ids[0, pos] == bb.model.config.image_token_index).all()
    assert (pos.diff() == 1).all()  # one contiguous run

    # Qwen2-VL style: grid from image_grid_thw with spatial merge 2 -> (8/2) x (4/2) tokens
    class Cfg:
        image_token_id = 7

        class vision_config:
            spatial_merge_size = 2

    class M(torch.nn.Module):
        config = Cfg

    q = Backbone(M(), None, get_box_format("qwen2vl"), "q")
    row = torch.tensor([[1, 2] + [7] * 8 + [3]])
    ((pos, gh, gw),) = image_grids(q, row, [_sample(image)], torch.tensor([[1, 8, 4]]))[0]
    assert (gh, gw) == (4, 2) and pos.tolist() == list(range(2, 10))


def test_finding_tokens(bb):
    tok = bb.tokenizer
    ids = tok("Region [50, 50, 100, 100]: nodules and a Mass.", add_special_tokens=False)["input_ids"]
    hit = finding_token_mask(tok, ids, finding_pattern(VOCAB))
    named = tok.decode([i for i, h in zip(ids, hit) if h])
    assert "nodule" in named and "Mass" in named and "Region" not in named and "and" not in named
    assert not any(
        finding_token_mask(tok, tok("massive cystic", add_special_tokens=False)["input_ids"], finding_pattern(VOCAB))
    )


def test_shape_nan_zero_and_restore(bb, image):
    s, normal, closed = _sample(image), _sample(image, boxes=(), findings=()), _sample(image, task="vqa_closed")
    texts = [GOOD, "Abnormality detected. Region [50, 50, 100, 100].", GOOD, GOOD, GOOD, ""]
    b = make_batch(bb, [s, s, normal, closed, s, s], texts)
    before = (bb.model.config._attn_implementation, bb.model.config.text_config._attn_implementation)
    r = VisionRelevanceReward().bind(bb, VOCAB)(b)
    assert (
        (bb.model.config._attn_implementation, bb.model.config.text_config._attn_implementation)
        == before
        == ("sdpa", "sdpa")
    )
    assert r.shape == (6,) and r.dtype == torch.float32
    assert 0.0 < r[0] < 1.0 and r[1] == 0.0 and math.isnan(r[2]) and math.isnan(r[3]) and r[5] == 0.0
    assert r[4] == r[0]  # same prompt, same completion
    bb.model.train()
    VisionRelevanceReward().bind(bb, VOCAB)(make_batch(bb, [s], [GOOD]))
    assert bb.model.training
    bb.model.eval()


def _manual(bb, b, i, layers=None, heads=None, query="token"):
    """Independent recomputation of r_att for completion i from a plain eager forward pass."""
    m = bb.model
    m.set_attn_implementation("eager")
    try:
        pi = b.inputs
        ids = torch.cat([pi["input_ids"][i : i + 1], b.completion_ids[i : i + 1]], 1)
        am = torch.cat([pi["attention_mask"][i : i + 1], b.completion_mask[i : i + 1]], 1)
        with torch.no_grad():
            out = m(
                input_ids=ids,
                attention_mask=am,
                position_ids=(am.cumsum(-1) - 1).clamp_min(0),
                pixel_values=pi["pixel_values"][i : i + 1],
                output_attentions=True,
            )
    finally:
        m.set_attn_implementation("sdpa")
    p = pi["input_ids"].shape[1]
    img = (pi["input_ids"][i] == m.config.image_token_index).nonzero().flatten()
    keys = img[BOX_PATCHES]
    tok = bb.tokenizer
    comp = b.completion_ids[i][b.completion_mask[i].bool()].tolist()
    text = tok.decode(comp, skip_special_tokens=True)
    word = text.index("nodule")
    qs = []
    for k in range(len(comp)):
        a = len(tok.decode(comp[:k], skip_special_tokens=True))
        z = len(tok.decode(comp[: k + 1], skip_special_tokens=True))
        if a < word + len("nodule") and word < z:
            qs.append(p + k - (0 if query == "token" else 1))
    att = torch.stack(out.attentions)[:, 0]  # [layers, heads, L, L]
    if layers is not None:
        att = att[layers]
    if heads is not None:
        att = att[:, heads]
    return float(att[:, :, qs][..., keys].sum(-1).mean())


@pytest.mark.parametrize("opts", [{}, {"layers": [-1]}, {"layers": [0], "heads": [1]}, {"query": "predict"}])
def test_matches_independent_recomputation(bb, image, opts):
    b = make_batch(bb, [_sample(image), _sample(image)], [GOOD, "Region [50, 50, 100, 100]: a nodule, maybe."])
    r = VisionRelevanceReward(**opts).bind(bb, VOCAB)(b)
    for i in range(2):
        assert abs(float(r[i]) - _manual(bb, b, i, **opts)) < 1e-5


def test_handmade_attentions_give_known_mass(bb, image, monkeypatch):
    """Replace the policy's mass on the box keys with one whose value is known; the head must return it."""
    import unveil.rewards.vision_relevance as vr

    b = make_batch(bb, [_sample(image), _sample(image)], [GOOD, "Region [50, 50, 100, 100]: cyst."])
    tok = bb.tokenizer
    hits = [
        finding_token_mask(tok, b.completion_ids[i][b.completion_mask[i].bool()].tolist(), finding_pattern(VOCAB))
        for i in range(2)
    ]
    assert all(any(h) for h in hits)
    per_layer = [0.2, 0.6]  # mass inside the box on finding-token queries, per layer (mean 0.4)
    seen = {}

    def fake_key_mass(model, inputs, completion_ids, completion_mask, key_weights, **kw):
        n, t = completion_ids.shape
        seen["weights"] = key_weights
        mass = torch.full((len(per_layer), n, 2, t + 1), 0.1)  # non-finding queries: 0.1 inside
        for li, frac in enumerate(per_layer):
            for r in range(n):
                for k, h in enumerate(hits[r]):
                    if h:  # row k + 1: the query of completion token k
                        mass[li, r, :, k + 1] = torch.tensor([frac, frac / 2])  # head 0: frac, head 1: frac / 2
        return mass, torch.zeros(n, t)

    monkeypatch.setattr(vr, "key_mass", fake_key_mass)
    r = VisionRelevanceReward().bind(bb, VOCAB)(b)
    want = np.mean([f * 0.75 for f in per_layer])  # heads average (1 + 1/2) / 2 = 0.75
    assert torch.allclose(r, torch.tensor([want, want], dtype=torch.float32), atol=1e-6)
    img = (b.inputs["input_ids"][0] == bb.model.config.image_token_index).nonzero().flatten()
    assert seen["weights"][0].nonzero().flatten().tolist() == img[BOX_PATCHES].tolist()  # the box's patches
    b.cache.clear()
    r = VisionRelevanceReward(layers=[1], heads=[0]).bind(bb, VOCAB)(b)
    assert torch.allclose(r, torch.tensor([0.6, 0.6]), atol=1e-6)
    b.cache.clear()
    # finding token rows hold the mass; the rows before them ("predict") hold 0.1 unless they are finding tokens too
    assert VisionRelevanceReward(query="predict", layers=[0]).bind(bb, VOCAB)(b)[1] < 0.2


def test_forward_shared_between_heads(bb, image):
    from unveil.models.policy import body_and_head

    calls = []
    tower = body_and_head(bb.model)[0].vision_tower
    h = tower.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[0]))
    try:
        comp = build_composite(
            {
                "vr": {
                    "_target_": "unveil.rewards.vision_relevance.VisionRelevanceReward",
                    "weight": 1.0,
                    "norm": "max",
                },
                "vr_last": {
                    "_target_": "unveil.rewards.vision_relevance.VisionRelevanceReward",
                    "weight": 1.0,
                    "layers": [-1],
                },
                "cf": {
                    "_target_": "unveil.rewards.vision_relevance.VisionCounterfactualReward",
                    "weight": 1.0,
                    "norm": "zscore",
                },
            },
            backbone=bb,
            vocab=VOCAB,
        )
        s = _sample(image)
        out = comp(make_batch(bb, [s, s, s, s], [GOOD, "Region [50, 50, 100, 100]: nodule.", "mass", ""]))
    finally:
        h.remove()
    # one pass (shared by vr, vr_last and cf's real-image log-probs) + one masked pass, each running
    # the tower once per prompt (4 completions of 2 prompts)
    assert calls == [2, 2]
    assert torch.isfinite(out.total).all() and set(out.per_head) == {"vr", "vr_last", "cf"}
    assert torch.isfinite(out.per_head["cf"]).all()


def test_counterfactual(bb, image):
    s, normal = _sample(image), _sample(image, boxes=(), findings=())
    b = make_batch(bb, [s, s, normal], [GOOD, "Region [50, 50, 100, 100]: nodule.", GOOD])
    r = VisionCounterfactualReward().bind(bb, VOCAB)(b)
    assert r.shape == (3,) and torch.isfinite(r[:2]).all() and math.isnan(r[2])
    # independently: mean token log-prob with the real image minus with the box filled grey (0 after normalisation)
    pv = b.inputs["pixel_values"]
    masked = pv.clone()
    masked[:, :, 16:32, 16:32] = 0.0
    assert torch.equal(
        mask_pixel_values(pv, b.samples, torch.zeros(3)),
        torch.where(torch.tensor([1.0, 1.0, 0.0])[:, None, None, None].bool(), masked, pv),
    )

    def mean_logp(pixels, i):
        pi = b.inputs
        ids = torch.cat([pi["input_ids"][i : i + 1], b.completion_ids[i : i + 1]], 1)
        am = torch.cat([pi["attention_mask"][i : i + 1], b.completion_mask[i : i + 1]], 1)
        with torch.no_grad():
            lg = bb.model(
                input_ids=ids,
                attention_mask=am,
                position_ids=(am.cumsum(-1) - 1).clamp_min(0),
                pixel_values=pixels[i : i + 1],
            ).logits
        t = b.completion_ids.shape[1]
        lp = torch.log_softmax(lg[0, -t - 1 : -1].float(), -1).gather(-1, b.completion_ids[i][:, None]).squeeze(-1)
        m = b.completion_mask[i].float()
        return float((lp * m).sum() / m.sum())

    for i in range(2):
        assert abs(float(r[i]) - (mean_logp(pv, i) - mean_logp(masked, i))) < 1e-4
    # a model that ignores the image gives exactly no gap
    b2 = make_batch(bb, [s], [GOOD])
    b2.inputs["pixel_values"] = torch.zeros_like(b2.inputs["pixel_values"])  # already grey everywhere
    assert abs(float(VisionCounterfactualReward().bind(bb, VOCAB)(b2)[0])) < 1e-6


def test_no_model_inputs_gives_nan(bb, image):
    b = Rollout(samples=[_sample(image)], texts=[GOOD], group=torch.tensor([0]))
    assert math.isnan(VisionRelevanceReward().bind(bb, VOCAB)(b)[0]) and math.isnan(
        VisionCounterfactualReward().bind(bb, VOCAB)(b)[0]
    )


@settings(max_examples=8, deadline=None)
@given(
    texts=st.lists(
        st.one_of(st.text(max_size=30), st.sampled_from([GOOD, "nodule " * 30, "é中😀 mass", "[0, 0, 100, 100]"])),
        min_size=2,
        max_size=2,
    )
)
def test_any_text_vision(bb, image, texts):
    """Texts re-tokenised by the head (no generated ids on the batch): finite in range, never raises."""
    s = _sample(image)
    b = make_batch(bb, [s, s], texts, with_ids=False)
    r = VisionRelevanceReward().bind(bb, VOCAB)(b)
    assert r.shape == (2,) and torch.isfinite(r).all()
    # a text that names no finding has no query tokens: exactly 0; one that names one puts some softmax
    # mass on the box keys (the mass is a probability: > 0 whenever a finding token was found)
    names = finding_pattern(VOCAB + list(s.findings))
    for i, t in enumerate(texts):
        assert (float(r[i]) > 0) == bool(names.search(t)), (t, float(r[i]))
    assert FORWARD_KEY in b.cache
    c = VisionCounterfactualReward().bind(bb, VOCAB)(b)
    assert c.shape == (2,) and torch.isfinite(c).all()


@pytest.mark.parametrize("with_ids", [True, False])
def test_an_image_placeholder_in_a_completion_is_nan_for_that_row_only(bb, image, with_ids):
    """A completion that emits the image token (generated ids, or text the head tokenises) would make
    the model expect an image it does not have: that row scores NaN, the others are scored."""
    s = _sample(image)
    texts = [GOOD, "Region [50, 50, 100, 100]: nodule <image> here.", "Region [50, 50, 100, 100]: nodule."]
    b = make_batch(bb, [s, s, s], texts, with_ids=with_ids)
    r, c = VisionRelevanceReward().bind(bb, VOCAB)(b), VisionCounterfactualReward().bind(bb, VOCAB)(b)
    for scores in (r, c):
        assert math.isnan(scores[1]) and torch.isfinite(scores[[0, 2]]).all(), scores
    alone = make_batch(bb, [s, s], [texts[0], texts[2]], with_ids=with_ids)  # the other rows as if alone
    torch.testing.assert_close(VisionRelevanceReward().bind(bb, VOCAB)(alone), r[[0, 2]])


def test_two_images_box_in_the_second(bb, image):
    """Multi-image prompts: the box of image 1 marks the second run of image tokens and masks the second image."""
    from unveil.rewards.vision_relevance import box_key_weights

    s = Sample(
        "m",
        images=[image, image],
        messages=[
            {"role": "user", "content": "<image>\n<image>\nCompare the two CT images."},
            {"role": "assistant", "content": "Region [50, 50, 100, 100]: nodule."},
        ],
        boxes=[BOX],
        box_images=[1],
        findings=["nodule"],
        task="localize",
    )
    b = make_batch(bb, [s, s], [GOOD, "mass"])
    ids = b.inputs["input_ids"]
    img = (ids[0] == bb.model.config.image_token_index).nonzero().flatten()
    assert img.numel() == 32
    w, ok = box_key_weights(bb, b)
    assert ok == [True, True] and w[0].nonzero().flatten().tolist() == img[16:][BOX_PATCHES].tolist()
    pv = b.inputs["pixel_values"]
    masked = mask_pixel_values(pv, b.samples, torch.zeros(3))
    assert torch.equal(masked[[0, 2]], pv[[0, 2]]) and (masked[1, :, 16:, 16:] == 0).all()
    r = VisionRelevanceReward(chunk_size=1).bind(bb, VOCAB)(b)  # not chunkable: two images per row -> one pass
    assert torch.isfinite(r).all() and r[0] > 0 and r[1] > 0
    assert torch.isfinite(VisionCounterfactualReward().bind(bb, VOCAB)(b)).all()
