"""Rollout engines (unveil.engines): the interface, HF = today's sampling, the IS correction, and the
vLLM server client against a local fake OpenAI-completions server. vLLM itself: tests/test_vllm.py."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file
from test_rl_stages import TokenReward, compose, mixed_batch, tiny  # noqa: F401  (the fixture)

from unveil.engines.base import pad_completions
from unveil.engines.hf import HFEngine
from unveil.engines.vllm_server import VLLMServerEngine
from unveil.stages.losses import grpo_loss, truncated_is_ratio
from unveil.stages.rollout import sample_rollouts


def test_hf_engine_is_todays_sampling_and_reports_no_sampler_logps(tiny):  # noqa: F811
    from unveil.stages.grpo import GRPOModule

    dm, make = tiny
    bb = make()
    batch = mixed_batch(GRPOModule(bb, TokenReward({5}), beta=0.0), dm, 4)
    torch.manual_seed(3)
    a = sample_rollouts(bb, batch, 3, max_new_tokens=8)
    torch.manual_seed(3)
    b = sample_rollouts(bb, batch, 3, max_new_tokens=8, engine=HFEngine())
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert a.texts == b.texts and torch.equal(a.group, b.group)
    assert "sampler_logps" not in b.extra  # on-policy: the IS weight is exactly 1


def test_grpo_step_with_hf_engine_has_is_weight_one(tiny):  # noqa: F811
    from unveil.stages.grpo import GRPOModule

    dm, make = tiny
    bb = make()
    module = GRPOModule(bb, TokenReward({5}), beta=0.0, rollout=HFEngine(), num_generations=2, max_new_tokens=6)
    ro = sample_rollouts(bb, mixed_batch(module, dm, 2), 2, max_new_tokens=6, engine=module.engine)
    old = torch.randn(ro.completion_ids.shape)
    assert module.importance_weights(ro, old) == {} and "is_ratio" not in ro.extra
    ratio, metrics = truncated_is_ratio(old, ro.extra.get("sampler_logps"), ro.completion_mask)
    assert torch.equal(ratio, torch.ones_like(old)) and metrics == {}


@pytest.mark.parametrize(
    "name,target",
    [
        ("hf", "unveil.engines.hf.HFEngine"),
        ("vllm", "unveil.engines.vllm_local.VLLMEngine"),
        ("vllm_server", "unveil.engines.vllm_server.VLLMServerEngine"),
    ],
)
def test_rollout_engine_is_selected_with_the_package_syntax(name, target):
    c = compose(["debug=fast", "stage=grpo", f"+rollout@stage.rollout={name}"])
    assert c.stage.rollout._target_ == target
    assert compose(["debug=fast", "stage=grpo"]).stage.rollout is None  # the default: the policy's generate


def test_a_bare_engine_name_is_refused_with_the_selection_syntax(tiny):  # noqa: F811
    from unveil.stages.grpo import GRPOModule

    _, make = tiny
    with pytest.raises(ValueError, match=r"\+rollout@stage.rollout=vllm"):
        GRPOModule(make(), TokenReward({5}), rollout="vllm")  # what `stage.rollout=vllm` would build


def test_truncated_is_ratio_math():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.1, -4.0, -1.0, 0.0]])
    sampler = torch.tensor([[-1.5, -0.5, -0.5, -9.0], [float("nan"), -1.0, -1.2, -7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    ratio, m = truncated_is_ratio(old, sampler, mask, cap=1.5)
    expect = torch.tensor(
        [[min(math.exp(0.5), 1.5), math.exp(-1.5), 1.0, 1.0], [1.0, math.exp(-3.0), min(math.exp(0.2), 1.5), 1.0]]
    )
    assert torch.allclose(ratio, expect)
    assert ratio[0, 0] == 1.5  # truncated at the cap
    deltas = torch.tensor([0.5, 1.5, 0.0, 3.0, 0.2])  # real tokens with a sampler log-prob
    assert m["sampling/sampling_logp_difference/mean"] == pytest.approx(float(deltas.mean()))
    assert m["sampling/sampling_logp_difference/max"] == pytest.approx(3.0)
    assert m["sampling/importance_sampling_ratio/max"] == pytest.approx(1.5)
    assert m["sampling/importance_sampling_ratio/min"] == pytest.approx(math.exp(-3.0))

    # the weight multiplies the policy-gradient term per token (old = current: surrogate -A), not the KL
    adv = torch.tensor([1.0, -2.0])
    ref = old - 0.3
    base, _ = grpo_loss(old, old, adv, mask, ref_logps=ref, beta=0.1, loss_type="bnpo")
    weighted, _ = grpo_loss(old, old, adv, mask, ref_logps=ref, beta=0.1, loss_type="bnpo", is_ratio=ratio)
    kl = torch.exp(ref - old) - (ref - old) - 1
    pg = -adv[:, None] * ratio + 0.1 * kl
    assert weighted == pytest.approx(float((pg * mask).sum() / mask.sum()))
    ones, _ = grpo_loss(old, old, adv, mask, ref_logps=ref, beta=0.1, loss_type="bnpo", is_ratio=torch.ones_like(old))
    assert torch.equal(ones, base)


def test_pad_completions_masks_after_first_eos():
    s = pad_completions([[5, 2, 7], [4, 4]], [[-0.1, -0.2, -0.3], [-1.0, -2.0]], eos_id=2, pad_id=0)
    assert s.completion_ids.tolist() == [[5, 2, 0], [4, 4, 0]]
    assert s.completion_mask.tolist() == [[1, 1, 0], [1, 1, 0]]
    assert torch.allclose(s.sampler_logps, torch.tensor([[-0.1, -0.2, 0.0], [-1.0, -2.0, 0.0]]))


class FakeVLLM(BaseHTTPRequestHandler):
    """OpenAI completions as vLLM answers them with return_tokens_as_token_ids: fixed token ids and log-probs."""

    seen: list = []
    ids: list[int] = []

    def log_message(self, *a):
        pass

    def _send(self, obj, code=200):
        raw = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        self._send({"data": [{"id": "tiny"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeVLLM.seen.append((self.path, body))
        if self.path in ("/collective_rpc", "/reset_prefix_cache", "/reset_encoder_cache", "/v1/load_lora_adapter"):
            return self._send({})
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            return self._send({"error": f"no route {self.path}"}, 404)
        choices = []
        for k in range(body["n"]):
            ids = FakeVLLM.ids[: 2 + k]  # completion k has 2 + k tokens
            lps = [-0.5 - 0.1 * j for j in range(len(ids))]
            toks = [f"token_id:{i}" for i in ids]
            if self.path == "/v1/chat/completions":
                content = [{"token": t, "logprob": lp} for t, lp in zip(toks, lps)]
                choices.append({"index": k, "logprobs": {"content": content}})
            else:
                choices.append({"index": k, "logprobs": {"tokens": toks, "token_logprobs": lps}})
        self._send({"choices": choices[::-1]})  # out of order: the client sorts by index


@pytest.fixture
def fake_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLM)
    FakeVLLM.seen = []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_server_client_samples_and_pushes_weights(tiny, fake_server, tmp_path):  # noqa: F811
    from unveil.stages.grpo import GRPOModule

    dm, make = tiny
    bb = make()
    tok = bb.tokenizer
    FakeVLLM.ids = [tok.convert_tokens_to_ids("a") if "a" in tok.get_vocab() else 7, 8, 9, tok.eos_token_id, 11]
    engine = VLLMServerEngine(base_url=fake_server, weights_dir=str(tmp_path / "w"))
    module = GRPOModule(bb, TokenReward({5}), beta=0.0, rollout=engine, num_generations=3, max_new_tokens=6)
    batch = mixed_batch(module, dm, 2)
    engine.sync(bb, 0)  # the first rollout: the server samples from what it loaded, nothing pushed
    ro = sample_rollouts(bb, batch, 3, max_new_tokens=6, engine=module.engine)
    ids = FakeVLLM.ids
    assert len(ro) == 6 and ro.group.tolist() == [0, 0, 0, 1, 1, 1]
    assert ro.completion_ids[0, :2].tolist() == ids[:2] and ro.completion_mask[0].tolist()[:3] == [1, 1, 0]
    assert ro.completion_mask[2].sum() == 4  # 4 tokens, the 4th is EOS: kept, masked after it
    assert torch.allclose(ro.extra["sampler_logps"][1, :3], torch.tensor([-0.5, -0.6, -0.7]))
    assert ro.texts[0] == tok.decode(ids[:2], skip_special_tokens=True)
    paths = [p for p, _ in FakeVLLM.seen]
    has_images = any(s.images for s in batch["samples"])
    assert ("/v1/chat/completions" in paths) == has_images
    body = FakeVLLM.seen[0][1]
    assert body["n"] == 3 and body["max_tokens"] == 6 and body["return_tokens_as_token_ids"] is True
    if has_images:
        chat = next(b for p, b in FakeVLLM.seen if p == "/v1/chat/completions")
        parts = [p["type"] for m in chat["messages"] for p in m["content"]]
        assert "image_url" in parts and chat["logprobs"] is True
    # the IS weight follows from the trainer's log-probs and the sampler's
    old = module.logprobs(module.model, ro).logps.detach()
    metrics = module.importance_weights(ro, old)
    assert metrics["sampling/importance_sampling_ratio/max"] <= 3.0 and "is_ratio" in ro.extra

    # after an optimiser step the weights are pushed: saved where the server reloads them from
    FakeVLLM.seen = []
    engine.sync(bb, 1)
    assert FakeVLLM.seen == [  # then the prefix and encoder caches (the old weights' KV, image embeddings) dropped
        ("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(tmp_path / "w")}}),
        ("/reset_prefix_cache", {}),
        ("/reset_encoder_cache", {}),
    ]
    saved = load_file(str(tmp_path / "w" / "model.safetensors"))
    state = bb.model.state_dict()
    assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in state)
    engine.sync(bb, 1)  # same step: nothing pushed
    assert len(FakeVLLM.seen) == 3


def test_server_errors_name_the_endpoint(fake_server):
    engine = VLLMServerEngine(base_url=fake_server + "/nope", push="none")
    with pytest.raises(RuntimeError, match="/nope/v1/completions: HTTP 404"):
        engine.post("/v1/completions", {})
    with pytest.raises(ValueError, match="push"):
        VLLMServerEngine(push="ftp")
