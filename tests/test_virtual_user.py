"""STLLaVA-Med stage 1 as released: ``sq_r`` turns later human turns into virtual-user turns, rendered
with role tokens of their own, and their questions are trained (heliossun/STLLaVA-Med, train.py,
``preprocess_v1_sq2``: the ``VUSER:`` tag masked, the question and its ``</s>`` trained)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import compose
from PIL import Image

import unveil.utils.resolvers  # noqa: F401
from unveil.data.collate import IGNORE, SFTCollator
from unveil.data.schema import Sample
from unveil.data.virtual_user import convert, record_rng, to_virtual_user

QUESTIONS = [
    "What organ is shown here?",
    "Is there a mass in the left lobe?",
    "Where is the opacity located?",
    "What does the arrow point at?",
    "Is the heart enlarged?",
]
ANSWERS = ["The liver.", "Yes, a small mass.", "In the right lower zone.", "A calcified nodule.", "No, it is normal."]


def llava_med_sample(i: int, image: str | None) -> Sample:
    """A LLaVA-Med-shaped record: the image in the first human turn, then four more rounds."""
    msgs = []
    for k, (q, a) in enumerate(zip(QUESTIONS, ANSWERS)):
        msgs += [{"role": "user", "content": ("<image>\n" if k == 0 and image else "") + q}]
        msgs += [{"role": "assistant", "content": a}]
    return Sample(id=f"med-{i}", images=[image] if image else [], messages=msgs, task="vqa_open")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("img") / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
    return str(p)


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """The tiny LLaVA built in code and two tiny HF families (their unveil chat templates), each with a
    tokenizer trained on the conversations' text; no vision warm-up (only the labels matter here)."""
    from unveil.models import factory

    corpus = [f"{q} {a}" for q, a in zip(QUESTIONS, ANSWERS)] * 20
    cache = tmp_path_factory.mktemp("tok")
    out = {"tiny_llava": factory.tiny_llava(compose(["model=tiny_llava"]).model, corpus, cache)}
    for arch in ("llava15", "qwen2_vl"):
        out[arch] = factory.tiny_hf(compose([f"model=tiny_{arch}"]).model, corpus, cache)
    return out


def test_sq_r_converts_about_half_of_the_later_human_turns_and_never_the_first(image):
    samples = [llava_med_sample(i, image) for i in range(60)]
    converted = later = 0
    for s in samples:
        msgs = convert(s, s.messages, 0.5, seed=0, epoch=0)
        roles = [m["role"] for m in msgs]
        assert roles[0] == "user" and roles[1::2] == ["assistant"] * 5  # the first turn and answers stay
        assert [m["content"] for m in msgs] == [m["content"] for m in s.messages]
        converted += roles[2::2].count("virtual_user")
        later += 4
    assert 0.4 < converted / later < 0.6, converted / later  # 240 Bernoulli(0.5) draws: sd 0.032
    assert all(m["role"] != "virtual_user" for m in to_virtual_user(samples[0].messages, 0.0, record_rng(0, 0, "a")))
    assert all(
        m["role"] == "virtual_user" for m in to_virtual_user(samples[0].messages, 1.0, record_rng(0, 0, "a"))[2::2]
    )
    # no image: the official loader converts nothing (has_image False)
    text_only = llava_med_sample(0, None)
    assert convert(text_only, text_only.messages, 1.0, seed=0, epoch=0) == text_only.messages


def test_draws_are_seeded_per_record_and_change_with_the_epoch(image):
    samples = [llava_med_sample(i, image) for i in range(30)]

    def roles(seed, epoch):
        return [tuple(m["role"] for m in convert(s, s.messages, 0.5, seed, epoch)) for s in samples]

    assert roles(0, 0) == roles(0, 0)  # a repeated (or resumed) run draws the same turns
    assert roles(0, 0) != roles(0, 1)  # each epoch draws afresh, as the official loader does
    assert roles(0, 0) != roles(1, 0)
    # per record: a record's draw does not depend on the batch it lands in
    one = convert(samples[7], samples[7].messages, 0.5, 0, 0)
    assert tuple(m["role"] for m in one) == roles(0, 0)[7]


def segments(bb, batch, i: int) -> list[str]:
    """The decoded runs of labelled tokens of row i (one run per trained turn)."""
    ids, lab = batch["input_ids"][i].tolist(), batch["labels"][i].tolist()
    runs, cur = [], []
    for t, y in zip(ids, lab):
        if y != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [bb.tokenizer.decode(r) for r in runs]


@pytest.mark.parametrize("arch", ["tiny_llava", "llava15", "qwen2_vl"])
def test_virtual_user_questions_are_trained_after_their_own_role_tag(backbones, image, arch):
    bb = backbones[arch]
    samples = [llava_med_sample(i, image) for i in range(6)]
    col = SFTCollator(bb, train_on_virtual_user=True, sq_r=0.5, seed=0)
    batch = col(samples)
    seen_vuser = 0
    for i, s in enumerate(samples):
        msgs = col.messages(s)
        text = bb.render(msgs)
        want = []
        for m in msgs[1:]:
            if m["role"] == "virtual_user":
                want.append(m["content"])
                seen_vuser += 1
            elif m["role"] == "assistant":
                want.append(m["content"])
        got = segments(bb, batch, i)
        # one labelled run per answer and per virtual-user question, in order, each the turn's text
        # plus its end-of-turn markup; no role tag is trained
        assert len(got) == len(want), (got, want)
        for g, w in zip(got, want):
            assert g.strip().startswith(w), (g, w)
            assert "USER" not in g and "vuser" not in g and "ASSISTANT" not in g and "assistant" not in g
        # questions of turns left to the human are not trained
        for m in msgs[2::2]:
            if m["role"] == "user":
                assert not any(m["content"] in g for g in got)
        n_vu = sum(m["role"] == "virtual_user" for m in msgs)
        tag = {"tiny_llava": "VUSER: ", "llava15": "VUSER: ", "qwen2_vl": "<|im_start|>vuser\n"}[arch]
        assert text.count(tag) == n_vu  # rendered with its own role tokens, not as a user
    assert seen_vuser > 0


def test_llava15_renders_the_official_v1_sq_turns():
    """conv v1_sq (TWO style, sep ' ', sep2 '</s>'), system prompt aside: USER: Q ASSISTANT: A</s>VUSER: Q</s> ..."""
    from unveil.models.chat_templates import LLAVA15_TEMPLATE

    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    msgs = [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "<image>\nQ1"},
        {"role": "assistant", "content": "A1"},
        {"role": "virtual_user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
        {"role": "user", "content": "Q3"},
        {"role": "assistant", "content": "A3"},
    ]
    t = env.from_string(LLAVA15_TEMPLATE)
    assert (
        t.render(messages=msgs)
        == "SYS USER: <image>\nQ1 ASSISTANT: A1</s>VUSER: Q2</s> ASSISTANT: A2</s>USER: Q3 ASSISTANT: A3</s>"
    )
    assert t.render(messages=msgs[:3], add_virtual_user_prompt=True).endswith("A1</s>VUSER:")
    assert t.render(messages=msgs[:4], add_generation_prompt=True).endswith("VUSER: Q2</s> ASSISTANT:")


def test_sq_r_needs_the_flag_and_a_template_with_a_virtual_user(backbones):
    bb = backbones["tiny_llava"]
    with pytest.raises(ValueError, match="train_on_virtual_user"):
        SFTCollator(bb, sq_r=0.5)
    with pytest.raises(ValueError, match="probability"):
        SFTCollator(bb, train_on_virtual_user=True, sq_r=1.5)
    hub_like = backbones["qwen2_vl"]
    saved = hub_like.processor.chat_template
    try:
        hub_like.processor.chat_template = saved.replace("add_virtual_user_prompt", "x")  # a hub template
        with pytest.raises(ValueError, match="model.chat_template"):
            SFTCollator(hub_like, train_on_virtual_user=True)
    finally:
        hub_like.processor.chat_template = saved


def test_stage_config_passes_sq_r_and_the_run_seed():
    cfg = compose(["stage.sq_r=0.5", "stage.train_on_virtual_user=true", "seed=7"])
    assert cfg.stage.sq_r == 0.5 and cfg.stage.sq_seed == 7
