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


def _check(bb, batch, ro, label, t_hf):
    assert len(ro) == 4 * G and ro.completion_mask.sum() > 0
    old = ro.logprobs(bb.model).logps
    _, m = truncated_is_ratio(old, ro.extra["sampler_logps"], ro.completion_mask)
    print(
        f"\n{label}: mismatch {m['sampling/sampling_logp_difference/mean']:.2e} mean, "
        f"{m['sampling/sampling_logp_difference/max']:.2e} max"
    )
    assert m["sampling/sampling_logp_difference/mean"] < 0.05  # same weights, fp32: numerics only


def _server_error(log) -> str:
    """The server log's error lines (the root cause is the first), not only its tail."""
    lines = log.read_text().splitlines()
    return "\n".join([ln for ln in lines if "Error" in ln][:20] + lines[-20:])


def test_vllm_server_samples_the_same_model(qwen, tmp_path):
    bb, batch, folder = qwen
    t0 = time.perf_counter()
    torch.manual_seed(0)
    sample_rollouts(bb, batch, G, max_new_tokens=NEW)
    t_hf = time.perf_counter() - t0
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
        t0 = time.perf_counter()
        ro = sample_rollouts(bb, batch, G, max_new_tokens=NEW, engine=engine)
        t_v = time.perf_counter() - t0
        print(f"\nrollout time, {len(ro)} completions x {NEW} tokens: HF {t_hf:.2f} s, vLLM server {t_v:.2f} s")
        _check(bb, batch, ro, "vllm_server", t_hf)
        engine.sync(bb, 1)  # pushes the weights: the server reloads them
    finally:
        proc.terminate()
        proc.wait(30)
