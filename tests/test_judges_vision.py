"""Judges that see, off the critical path: a local HTTP server (127.0.0.1, started here) checks
that each request carries the image (the data URL decoded and compared pixel by pixel) and the
paper's rubric; a server that sleeps or answers 500 costs a step no more than its deadline and
scores NaN, counted; a cache hit sends nothing; the tiny VLM judge scores; a judge key with a
typo fails with an error naming it."""

from __future__ import annotations

import base64
import io
import math
import time

import numpy as np
import pytest
import torch
from chat_server import ChatServer, chat, local_only
from PIL import Image

from unveil.data.schema import Sample
from unveil.judges import JudgeItem, build_judge, load_rubric
from unveil.judges.rubrics import parse_pair, parse_score
from unveil.rewards.base import Rollout

OPENAI = "unveil.judges.openai_compat.OpenAIJudge"


class Endpoint:
    """A chat-completions server: records each request body; replies per ``reply`` (status, text),
    after ``delay`` seconds."""

    def __init__(self):
        self.reply: tuple[int, str] = (200, "Score: 7")
        self.delay = 0.0

        def answer(body):
            status, text = self.reply
            return status, chat(text) if status == 200 else {"error": text}, self.delay

        self.server = ChatServer(answer)
        self.url = self.server.url

    @property
    def requests(self) -> list[dict]:
        return [r["body"] for r in self.server.requests]


@pytest.fixture
def endpoint(monkeypatch):
    local_only(monkeypatch)
    ep = Endpoint()
    yield ep
    ep.server.close()


def judge(ep: Endpoint, **kw):
    cfg = {"_target_": OPENAI, "model": "vision-grader", "base_url": ep.url, "api_key_env": "UNVEIL_NO_SUCH_KEY"}
    return build_judge({**cfg, "backoff": 0.01, "timeout_s": 5, "deadline_s": 10, **kw})


def picture(path, w: int, h: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def sent_images(body: dict) -> list[np.ndarray]:
    """The pictures a request carries: each data URL decoded back to pixels."""
    out = []
    for part in body["messages"][-1]["content"]:
        if part.get("type") == "image_url":
            url = part["image_url"]["url"]
            assert url.startswith("data:image/png;base64,")
            out.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")))
    return out


def text_of(body: dict) -> str:
    content = body["messages"][-1]["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


# --- what is sent -------------------------------------------------------------------------------
def test_the_request_carries_the_image_and_umeds_rubric(endpoint, tmp_path):
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    pixels = picture(small, 40, 24)
    picture(big, 300, 100, seed=1)
    j = judge(endpoint, rubric="umed_relevance", max_image_side=64)
    got = j.score_batch([JudgeItem("Is there a mass?", "Mass in the left lung.", "Left lung mass.", [small, big])])
    assert got == [pytest.approx(0.7)]
    body = endpoint.requests[0]
    imgs = sent_images(body)
    assert len(imgs) == 2 and np.array_equal(imgs[0], pixels)  # small enough: sent as it is, pixel for pixel
    assert imgs[1].shape == (21, 64, 3)  # longer side shrunk to max_image_side, aspect kept (300x100 -> 64x21)
    expected = np.asarray(Image.open(big).convert("RGB").resize((64, 21), Image.Resampling.LANCZOS), dtype=float)
    assert np.abs(imgs[1].astype(float) - expected).mean() < 8  # the same picture, downsampled
    rubric = load_rubric("umed_relevance")
    assert body["messages"][0] == {"role": "system", "content": rubric.system}
    assert text_of(body) == rubric.render("Is there a mass?", "Mass in the left lung.", "Left lung mass.")
    assert "Reference answer: Mass in the left lung." in text_of(body) and body["temperature"] == 0.0


def test_stllava_preference_sends_both_answers_with_the_image_and_reads_two_scores(endpoint, tmp_path):
    img = tmp_path / "ct.png"
    pixels = picture(img, 32, 32)
    endpoint.reply = (200, "8 3\nAssistant 1 names the lesion the image shows; Assistant 2 does not.")
    j = judge(endpoint, rubric="stllava_preference")
    pairs = [(JudgeItem("What does the scan show?", "", "A mass in the liver.", [img]), "A normal scan.")]
    assert j.score_pairs(pairs) == [(pytest.approx(0.8), pytest.approx(0.3))]
    body = endpoint.requests[0]
    text = text_of(body)
    # the official layout (heliossun/STLLaVA-Med llava/eval/eval_gpt4v_review.py), text first, then the image
    assert text.startswith("[Question]\nWhat does the scan show?\n\n[Answer 1]\nA mass in the liver.\n\n")
    assert "[Answer 2]\nA normal scan.\n\n[End of Answer 2]\n\n[System]\n" in text and "biomedical expert" in text
    assert body["messages"][-1]["content"][0]["type"] == "text" and np.array_equal(sent_images(body)[0], pixels)
    assert body["temperature"] == 0.2 and len(endpoint.requests) == 1  # one request per pair
    with pytest.raises(ValueError, match="compares two answers"):
        from unveil.rewards.relevance import RelevanceReward

        RelevanceReward(judge={"_target_": OPENAI, "model": "m", "rubric": "stllava_preference"})


def test_mmedpo_rubric_and_json_replies(endpoint, tmp_path):
    img = tmp_path / "cxr.png"
    picture(img, 16, 16)
    endpoint.reply = (200, '```json\n{"score": 6, "reason": "right finding, wrong side"}\n```')
    j = judge(endpoint, rubric="mmedpo_clinical_relevance")
    assert j.score("Which lung?", "Left lower lobe nodule.", "Right lower lobe nodule.", [img]) == pytest.approx(0.6)
    assert "Candidate answer (may contain errors): Right lower lobe nodule." in text_of(endpoint.requests[0])
    assert len(sent_images(endpoint.requests[0])) == 1
    j = judge(endpoint, rubric="mmedpo_clinical_relevance", images=False)  # the paper's text-only Med-LLMs
    j.score("q", "r", "a", [img])
    assert isinstance(endpoint.requests[-1]["messages"][-1]["content"], str)


@pytest.mark.parametrize(
    "reply,expected",
    [
        ("7", 0.7),
        ("Score: 7/10", 0.7),
        ("I would give it 8 out of 10.", 0.8),
        ('{"score": 9}', 0.9),
        ('{"rating": "4"}', 0.4),
        ("Score: 10", 1.0),
        ("0", 0.0),
        ("banana", math.nan),
        ("", math.nan),
        (None, math.nan),
        ("42", math.nan),
        ("-3", math.nan),
        ('{"score": "high"}', math.nan),
        ("11/10", math.nan),
    ],
)
def test_parse_score_garbage_is_nan_not_zero(reply, expected):
    got = parse_score(reply)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_parse_pair():
    assert parse_pair("8 3\nbecause") == (0.8, 0.3) and parse_pair("7, 9") == (0.7, 0.9)
    assert parse_pair('{"scores": [6, 2]}') == (0.6, 0.2)
    assert parse_pair('{"answer_1": 5, "answer_2": 10}') == (0.5, 1.0)
    for bad in ("Answer 1 is better", "8\n3", "8 3 5", "", None, "12 3"):
        a, b = parse_pair(bad)
        assert math.isnan(a) and (math.isnan(b) or bad == "12 3")


def test_a_cache_hit_sends_no_second_request(endpoint, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    picture(a, 20, 20, seed=0)
    picture(b, 20, 20, seed=1)
    j = judge(endpoint)
    item = JudgeItem("q", "ref", "answer", [a])
    assert j.score_batch([item, item]) == [pytest.approx(0.7)] * 2 and len(endpoint.requests) == 1  # deduplicated
    endpoint.reply = (200, "2")
    assert j.score_batch([item]) == [pytest.approx(0.7)] and len(endpoint.requests) == 1  # cached
    assert j.score_batch([JudgeItem("q", "ref", "answer", [b])]) == [pytest.approx(0.2)]  # other pixels: asked
    assert j.score_batch([JudgeItem("q", "ref", "other answer", [a])]) == [pytest.approx(0.2)]  # other text: asked
    assert len(endpoint.requests) == 3 and j.totals["cache_hits"] == 1 and j.totals["requests"] == 3
    endpoint.reply = (200, "no idea")  # a failure is not cached: asked again next time
    fresh = JudgeItem("q", "ref", "third", [a])
    assert math.isnan(j.score_batch([fresh])[0]) and math.isnan(j.score_batch([fresh])[0])
    assert len(endpoint.requests) == 5


# --- off the critical path ---------------------------------------------------------------------
def relevance_batch(tmp_path, n_groups: int = 2, g: int = 3) -> Rollout:
    img = tmp_path / "study.png"
    if not img.exists():
        picture(img, 24, 24)
    samples = [
        Sample(
            f"s{k}",
            images=[str(img)],
            messages=[
                {"role": "user", "content": "<image>\nIs there an abnormality?"},
                {"role": "assistant", "content": f"Nodule in the left lung, case {k}."},
            ],
            task="vqa_open",
        )
        for k in range(n_groups)
    ]
    rows = [s for s in samples for _ in range(g)]
    return Rollout(
        samples=rows,
        texts=[f"answer {i}" for i in range(len(rows))],
        group=torch.arange(n_groups).repeat_interleave(g),
    )


def composite(ep: Endpoint, **judge_kw):
    from unveil.rewards.composite import build_composite

    jcfg = {"_target_": OPENAI, "model": "m", "base_url": ep.url, "api_key_env": "UNVEIL_NO_SUCH_KEY", **judge_kw}
    return build_composite(
        {
            "relevance": {
                "_target_": "unveil.rewards.relevance.RelevanceReward",
                "weight": 1.0,
                "norm": "none",
                "missing": "group_mean",
                "judge": jcfg,
            },
            "format": {"_target_": "unveil.rewards.format.FormatReward", "weight": 0.0},
        }
    )


@pytest.mark.parametrize("failure", ["sleeps_10s", "http_500"])
def test_a_slow_or_failing_endpoint_costs_at_most_the_deadline_and_scores_nan_counted(endpoint, tmp_path, failure):
    if failure == "sleeps_10s":
        endpoint.delay = 10.0
    else:
        endpoint.reply = (500, "internal error")
    comp = composite(endpoint, timeout_s=2, deadline_s=1.0, retries=1, backoff=0.05)
    batch = relevance_batch(tmp_path)
    t0 = time.perf_counter()
    out = comp(batch)
    took = time.perf_counter() - t0
    assert took < 2.5, f"the reward step took {took:.1f}s with a 1 s deadline"
    assert torch.isnan(out.per_head["relevance"]).all()
    assert out.stats["rewards/relevance/judge_failures"] == 6.0 and out.stats["rewards/relevance/judge_requests"] == 6
    assert torch.equal(out.total, torch.zeros(6))  # no score, no advantage: the step goes on
    judge_ = comp.heads[0].head.judge
    assert judge_.totals["timeout" if failure == "sleeps_10s" else "http"] == 6
    assert len(endpoint.requests) >= 6  # every row was asked (a 500 is retried while the deadline allows)


def test_a_failed_row_moves_no_advantage_and_leaves_its_group_alone():
    """missing: group_mean: a row the judge could not score gets its group's mean, so its GRPO
    advantage from that head is 0 and the other rows' advantages are what they would be without it."""
    from unveil.rewards.composite import CompositeReward, HeadSpec
    from unveil.stages.losses import group_advantages

    class Fixed:
        name, needs = "fixed", frozenset({"text"})

        def __init__(self, v):
            self.v = torch.tensor(v)

        def __call__(self, batch):
            return self.v

    nan = float("nan")
    batch = Rollout(samples=[None] * 4, texts=["a"] * 4, group=torch.tensor([0, 0, 0, 0]))
    with_nan = CompositeReward([HeadSpec("judge", Fixed([nan, 0.2, 0.6, 1.0]), 1.0, "none", "group_mean")])(batch)
    adv = group_advantages(with_nan.total, batch.group, "group")
    assert float(adv[0]) == pytest.approx(0.0, abs=1e-6)
    without = group_advantages(torch.tensor([0.2, 0.6, 1.0]), torch.zeros(3, dtype=torch.long), "none")
    got = group_advantages(with_nan.total, batch.group, "none")
    assert torch.allclose(got[1:], without, atol=1e-6)
    # the old rule (NaN counts 0) would have pushed the failed row down: kept for heads whose NaN means "n/a"
    zero = CompositeReward([HeadSpec("judge", Fixed([nan, 0.2, 0.6, 1.0]), 1.0, "none", "zero")])(batch)
    assert float(group_advantages(zero.total, batch.group, "none")[0]) < -0.4


def test_requests_start_before_the_other_heads_run(endpoint, tmp_path):
    """The composite submits the judge's requests before computing any head: a slow endpoint and
    a slow head overlap instead of adding up."""
    from unveil.rewards.composite import CompositeReward, HeadSpec
    from unveil.rewards.relevance import RelevanceReward

    endpoint.delay = 0.6

    class Slow:
        name, needs = "slow", frozenset({"text"})

        def __call__(self, batch):
            time.sleep(0.6)
            return torch.zeros(len(batch))

    rel = RelevanceReward(judge=judge(endpoint, max_workers=6))
    comp = CompositeReward([HeadSpec("slow", Slow(), 1.0, "none"), HeadSpec("relevance", rel, 1.0, "none")])
    t0 = time.perf_counter()
    out = comp(relevance_batch(tmp_path))
    assert time.perf_counter() - t0 < 1.1  # 0.6 + 0.6 if they ran one after the other
    assert torch.allclose(out.per_head["relevance"], torch.full((6,), 0.7))


# --- plugging a judge in --------------------------------------------------------------------------
def test_a_typo_in_a_judge_key_fails_naming_it():
    with pytest.raises(
        ValueError, match=r"reward.relevance.judge: unknown key\(s\) \['modle'\].*did you mean 'model'\?"
    ):
        build_judge({"_target_": OPENAI, "modle": "gpt-4o"}, where="reward.relevance.judge")
    with pytest.raises(ValueError, match=r"`kind: openai` is no longer read.*_target_: unveil.judges.openai_compat"):
        build_judge({"kind": "openai", "model": "gpt-4o"})
    with pytest.raises(ValueError, match="names nothing importable"):
        build_judge({"_target_": "unveil.judges.nope.Judge"})
    with pytest.raises(ValueError, match="unknown rubric field"):
        build_judge({"_target_": OPENAI, "model": "m", "rubric": {"name": "x", "template": "{answer}", "scael": 5}})


def test_a_typo_in_the_composed_config_fails_before_training(make_cfg):
    from unveil.rewards.composite import build_composite

    overlap = "{_target_:unveil.judges.base.OverlapJudge,negation_penalt:0.3}"
    cfg = make_cfg("reward=relevance_only", f"reward.relevance.judge={overlap}")
    with pytest.raises(ValueError, match=r"reward.relevance.judge: unknown key\(s\) \['negation_penalt'\]"):
        build_composite(cfg.reward)
    cfg = make_cfg("reward=relevance_only", f"reward.relevance.judge={overlap.replace('penalt:', 'penalty:')}")
    assert build_composite(cfg.reward).heads[0].head.judge.negation_penalty == 0.3


# --- the local vision-language judge ---------------------------------------------------------------
TINY_VLM = {
    "_target_": "unveil.models.factory.tiny_hf",
    "arch": "qwen2_vl",
    "box_format": "qwen2vl",
    "spec": {
        "image_size": 28,
        "patch_size": 14,
        "vision_hidden": 16,
        "vision_layers": 1,
        "vision_heads": 2,
        "hidden": 32,
        "layers": 1,
        "heads": 2,
        "kv_heads": 1,
        "intermediate": 64,
        "max_positions": 1024,
        "vocab_size": 320,
        "chat_template": None,
    },
}


def test_the_tiny_vlm_judge_scores_and_is_loaded_once(tmp_path, monkeypatch):
    import unveil.models.factory as factory
    from unveil.judges import hf_vlm

    built = []
    real = factory.build_backbone
    monkeypatch.setattr(factory, "build_backbone", lambda *a, **k: built.append(1) or real(*a, **k))
    monkeypatch.setattr(hf_vlm, "_BACKBONES", {})
    img = tmp_path / "x.png"
    picture(img, 28, 28)
    cfg = {
        "_target_": "unveil.judges.hf_vlm.HFVLMJudge",
        "_recursive_": False,
        "model": TINY_VLM,
        "rubric": "umed_relevance",
    }
    yes_no = build_judge({**cfg, "mode": "yes_no"})
    items = [JudgeItem("Is there a nodule?", "A nodule.", "A nodule.", [img]), JudgeItem("q", "ref", "other", [img])]
    s = yes_no.score_batch(items)
    assert len(s) == 2 and all(0.0 < v < 1.0 for v in s)  # p(Yes) / (p(Yes) + p(No)) of a random model
    gen = build_judge({**cfg, "max_new_tokens": 4})  # the same model config: the same loaded copy
    assert gen.bb is yes_no.bb and len(built) == 1
    got = gen.score_batch(items)
    assert len(got) == 2 and all(math.isnan(v) or 0.0 <= v <= 1.0 for v in got)
    # the reply is read with the rubric's parser: make the model say "7"
    seven = gen.bb.tokenizer("7", add_special_tokens=False)["input_ids"][0]
    model = gen.bb.model

    def says_seven(module, args, out):
        out.logits[..., seven] = 1e4
        return out

    hook = model.register_forward_hook(says_seven)
    try:
        assert build_judge({**cfg, "max_new_tokens": 1}).score_batch(items) == [pytest.approx(0.7)] * 2
    finally:
        hook.remove()
    # the image reaches the model: a different picture changes p(Yes)
    other = tmp_path / "y.png"
    picture(other, 28, 28, seed=5)
    moved = yes_no.score_batch([JudgeItem(*items[0], [other])])[0]
    assert moved != pytest.approx(s[0], abs=1e-7)


# --- a real training run with a judge that never answers in time -----------------------------------
def test_grpo_with_a_judge_that_sleeps_trains_on_with_nan_counted(endpoint, tmp_path):
    """debug=fast GRPO with relevance from an endpoint that takes 10 s per request: every step
    waits at most its 0.5 s deadline, the relevance head logs NaN and its failure count, and the
    run finishes its steps."""
    import csv

    from test_rl_stages import compose

    from unveil.train import train

    endpoint.delay = 10.0
    judge_cfg = (
        f"{{_target_:{OPENAI},model:m,base_url:'{endpoint.url}',api_key_env:UNVEIL_NO_SUCH_KEY,"
        "timeout_s:2,deadline_s:0.5,retries:0}"
    )
    overrides = [
        "debug=fast",
        "stage=grpo",
        "reward=relevance_only",
        f"reward.relevance.judge={judge_cfg}",
        "stage.num_generations=2",
        "stage.max_new_tokens=8",
        "data.batch_size=2",
        "trainer.max_steps=2",
        "trainer.val_check_interval=1000",
        "eval.enabled=false",
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    t0 = time.perf_counter()
    metrics = train(compose(overrides))
    took = time.perf_counter() - t0
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    steps = [r for r in rows if r.get("train/rewards/relevance/judge_failures")]
    assert len(steps) == 2, "both steps ran and logged the judge's failures"
    assert all(float(r["train/rewards/relevance/judge_failures"]) == 4.0 for r in steps)  # 2 prompts x 2 samples
    assert all(r.get("train/rewards/relevance/mean", "") in ("", "nan") for r in steps)  # NaN (not logged), not 0
    assert (tmp_path / "run" / "backbone").exists() and math.isfinite(metrics.get("train/loss", 0.0))
    assert took < 60, f"2 steps took {took:.0f}s: the 10 s endpoint stalled the run"
