"""vLLM engines against a tiny random Qwen2-VL saved to disk: `make test-vllm` only (its own venv,
vLLM's CPU build). It lives outside tests/ so that `make test`, whose venv has no vLLM (an optional
extra), never collects it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
import vllm  # noqa: F401  (this module runs only where vLLM is installed)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tests"))
from test_rl_stages import compose  # noqa: E402

from unveil.data.collate import PromptCollator  # noqa: E402
from unveil.data.records import load_records  # noqa: E402
from unveil.engines.vllm_server import VLLMServerEngine  # noqa: E402
from unveil.models.factory import build_backbone  # noqa: E402
from unveil.stages.losses import truncated_is_ratio  # noqa: E402
from unveil.stages.rollout import sample_rollouts  # noqa: E402

G, NEW = 4, 16


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    dm = load_records(compose(["debug=fast"]).data)
    # heads=2: head_dim 64 / 2 = 32, the smallest vLLM's CPU attention takes (32, 64, 80, ...; the yaml's 4 heads
    # give 16: "Unsupported CPU attention configuration: head_dim=16")
    c = compose(["debug=fast", "model=tiny_qwen2_vl", "model.spec.heads=2"])
    bb = build_backbone(c.model, peft=c.peft, corpus=dm.corpus(), cache_dir=str(tmp_path_factory.mktemp("tok")))
    folder = tmp_path_factory.mktemp("qwen")
    bb.save(folder)
    batch = PromptCollator(bb)(dm.data["train"][:4])
    return bb, batch, folder


def _mismatch(bb, ro, label) -> float:
    """Mean |policy log-prob - sampler log-prob| over the completion tokens (TRL's sampling_logp_difference)."""
    assert len(ro) == 4 * G and ro.completion_mask.sum() > 0
    old = ro.logprobs(bb.model).logps
    _, m = truncated_is_ratio(old, ro.extra["sampler_logps"], ro.completion_mask)
    mean, mx = m["sampling/sampling_logp_difference/mean"], m["sampling/sampling_logp_difference/max"]
    print(f"\n{label}: sampler/trainer log-prob mismatch {mean:.2e} mean, {mx:.2e} max")
    return mean


def _timed(label, fn):
    """fn() twice: the first call pays the warm-up (vLLM's first request, HF's first generate)."""
    times = []
    for _ in range(2):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        ro = fn()
        times.append(time.perf_counter() - t0)
    tokens = int(ro.completion_mask.sum())
    print(f"\n{label}: {len(ro)} completions, {tokens} tokens: {times[0]:.2f} s first, {times[1]:.2f} s warm")
    return ro


def _server_error(log) -> str:
    """The server log's error lines (the root cause is the first), not only its tail."""
    lines = log.read_text().splitlines()
    return "\n".join([ln for ln in lines if "Error" in ln][:20] + lines[-20:])


def test_vllm_server_samples_the_same_model(qwen, tmp_path):
    bb, batch, folder = qwen
    _timed("HF generate", lambda: sample_rollouts(bb, batch, G, max_new_tokens=NEW))
    # the CPU backend reserves gpu_memory_utilization x host memory (0.92 by default) and a KV cache of
    # VLLM_CPU_KVCACHE_SPACE GiB: a few percent and 1 GiB serve this tiny model next to the other processes here
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    port = "8765"
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--port",
        port,
        "--dtype",
        "float32",
        "--logprobs-mode",
        "processed_logprobs",
        "--max-model-len",
        "2048",
        "--gpu-memory-utilization",
        "0.1",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, _server_error(tmp_path / "server.log")
                time.sleep(1)
        engine = VLLMServerEngine(base_url=url, weights_dir=str(tmp_path / "w"))
        engine.sync(bb, 0)
        ro = _timed("vLLM server", lambda: sample_rollouts(bb, batch, G, max_new_tokens=NEW, engine=engine))
        assert _mismatch(bb, ro, "same weights") < 0.05  # fp32 both sides: numerics only
        with torch.no_grad():  # an "optimiser step": the server still samples from the old weights ...
            for p in bb.model.parameters():
                p.add_(0.5 * torch.randn_like(p))
        stale = _mismatch(bb, sample_rollouts(bb, batch, G, max_new_tokens=NEW, engine=engine), "before the push")
        engine.sync(bb, 1)  # ... until the weights are pushed (reload_weights) and its prefix cache reset
        pushed = _mismatch(bb, sample_rollouts(bb, batch, G, max_new_tokens=NEW, engine=engine), "after the push")
        assert stale > 0.1 and pushed < 0.05
    finally:
        proc.terminate()
        proc.wait(30)


def test_vllm_colocated_samples_the_same_model(qwen, tmp_path, monkeypatch):
    from unveil.engines.vllm_local import VLLMEngine

    bb, batch, _ = qwen
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    engine = VLLMEngine(workdir=str(tmp_path / "m"), gpu_memory_utilization=0.1, dtype="float32", max_model_len=2048)
    try:
        engine.sync(bb, 0)
        ro = _timed("vLLM colocated", lambda: sample_rollouts(bb, batch, G, max_new_tokens=NEW, engine=engine))
        assert _mismatch(bb, ro, "colocated, same weights") < 0.05
        with torch.no_grad():
            for p in bb.model.parameters():
                p.add_(0.5 * torch.randn_like(p))
        stale = _mismatch(bb, sample_rollouts(bb, batch, G, max_new_tokens=NEW, engine=engine), "before the sync")
        engine.sync(bb, 1)
        synced = _mismatch(bb, sample_rollouts(bb, batch, G, max_new_tokens=NEW, engine=engine), "after the sync")
        assert stale > 0.1 and synced < 0.05
    finally:
        engine.close()
