"""HFJudge on a tiny random LlamaForCausalLM with a BPE tokenizer trained here.

A random model cannot judge anything: these tests check only the plumbing (prompting, batching,
reading the reply, the Yes/No probability) and the bounds/NaN contract, plus the reply parser on
hand-written replies.
"""

from __future__ import annotations

import math

import pytest
import torch

from unveil.data.schema import Sample
from unveil.judges import build_judge
from unveil.judges.hf import HFJudge, parse_score
from unveil.rewards.base import Rollout
from unveil.rewards.relevance import RelevanceReward

ITEMS = [
    (
        "Is there a nodule?",
        "Abnormality detected. Region [10, 10, 30, 30]: nodule.",
        "Region [10, 10, 30, 30]: nodule.",
    ),
    ("q", "No abnormality detected.", ""),
    ("é中😀", "ref", "x" * 5000),
]


@pytest.fixture(scope="module")
def tiny_lm():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Yes No yes no Score: 7 8/10 0 10", "Question: Reference answer: Assistant's answer:"] * 4
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        yield LlamaForCausalLM(cfg), fast
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "reply,expected",
    [
        ("8", 0.8),
        ("Score: 7.5", 0.75),
        (" 8/10", 0.8),
        ("10", 1.0),
        ("0", 0.0),
        ("11", math.nan),
        ("none", math.nan),
        ("", math.nan),
        ("-3", 0.3),
        ("777", math.nan),
        ("7777", math.nan),
        ("1e9", 0.1),
        ("100000", math.nan),
    ],
)
def test_parse_score(reply, expected):
    got = parse_score(reply)
    assert (math.isnan(got) and math.isnan(expected)) or abs(got - expected) < 1e-9


def test_yes_no_mode_is_a_probability(tiny_lm):
    model, tok = tiny_lm
    j = HFJudge(model=model, tokenizer=tok, mode="yes_no", batch_size=2)
    s = j.score_batch(ITEMS)
    assert len(s) == 3 and all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in s)
    # the score is p(Yes) / (p(Yes) + p(No)) of the next token: recompute it for the first item
    enc = tok(j._render(*ITEMS[0]), return_tensors="pt")
    with torch.no_grad():
        p = torch.softmax(model(**enc).logits[0, -1], -1)
    py, pn = p[j._yes].sum(), p[j._no].sum()
    assert abs(s[0] - float(py / (py + pn))) < 1e-5
    assert j._yes and j._no and not set(j._yes) & set(j._no)


def test_score_mode_plumbing(tiny_lm, monkeypatch):
    model, tok = tiny_lm
    j = HFJudge(model=model, tokenizer=tok, mode="score", max_new_tokens=4, batch_size=2)
    s = j.score_batch(ITEMS)
    assert len(s) == 3 and all(math.isnan(v) or 0.0 <= v <= 1.0 for v in s)
    # the reply is read from the generated tokens: force the model to say "7"
    seven = tok("7", add_special_tokens=False)["input_ids"][0]
    real = model.forward

    def says_seven(*a, **kw):
        out = real(*a, **kw)
        out.logits[..., seven] = 1e4
        return out

    monkeypatch.setattr(model, "forward", says_seven)
    assert HFJudge(model=model, tokenizer=tok, max_new_tokens=1).score_batch(ITEMS[:2]) == [0.7, 0.7]
    assert math.isnan(HFJudge(model=model, tokenizer=tok, max_new_tokens=3).score_batch(ITEMS[:1])[0])  # "777"


def test_never_raises(tiny_lm, monkeypatch):
    model, tok = tiny_lm
    j = HFJudge(model=model, tokenizer=tok, mode="yes_no")

    def broken(*a, **kw):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(model, "forward", broken)
    s = j.score_batch(ITEMS)
    assert len(s) == 3 and all(math.isnan(v) for v in s)
    assert j.score_batch([]) == []


def test_build_judge_and_relevance_head(tiny_lm):
    model, tok = tiny_lm
    j = build_judge({"_target_": "unveil.judges.hf.HFJudge", "model": model, "tokenizer": tok, "mode": "yes_no"})
    assert isinstance(j, HFJudge)
    s = Sample(
        "a",
        messages=[{"role": "user", "content": "Is there a nodule?"}, {"role": "assistant", "content": ITEMS[0][1]}],
        task="vqa_open",
    )
    r = RelevanceReward(judge=j)(Rollout(samples=[s, s], texts=["nodule", ""], group=torch.tensor([0, 0])))
    assert r.shape == (2,) and torch.isfinite(r).all() and ((r >= 0) & (r <= 1)).all()
    with pytest.raises(ValueError):
        HFJudge()
