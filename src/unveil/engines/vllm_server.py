"""vLLM as a server: completions sampled over HTTP from an OpenAI-compatible ``vllm serve``.

Start the server on the backbone saved with ``Backbone.save`` (its chat template is then the
trainer's), with the sampled tokens' own log-probs::

    VLLM_SERVER_DEV_MODE=1 vllm serve <dir> --logprobs-mode processed_logprobs     # push: full weights
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve <dir> --enable-lora ...        # push: lora

Text prompts go to ``/v1/completions`` (the rendered prompt text), prompts with images to
``/v1/chat/completions`` (the messages, images as PNG data URLs); ``n`` = G completions each,
``logprobs`` with ``return_tokens_as_token_ids`` so the ids and log-probs are the sampler's.
Weights after each optimiser step (``push``): ``weights`` saves the merged policy to
``weights_dir`` (a folder the server can read) and calls ``/collective_rpc`` ``reload_weights``
(vLLM's dev-mode RPC); ``lora`` saves the adapter and hot-loads it (``/v1/load_lora_adapter``),
sampling with it by name; ``none`` never pushes (a frozen sampler, e.g. for tests)."""

from __future__ import annotations

import json
import os
import tempfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from unveil.engines.base import RolloutEngine, Sampled, pad_completions
from unveil.engines.prompts import chat_messages, prompt_text, save_weights
from unveil.models.generation import decode

PUSH = ("weights", "lora", "none")


class VLLMServerEngine(RolloutEngine):
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        model: str | None = None,
        push: str = "weights",
        weights_dir: str | None = None,
        timeout_s: float = 600.0,
        max_workers: int = 8,
        api_key_env: str = "VLLM_API_KEY",
    ):
        if push not in PUSH:
            raise ValueError(f"stage.rollout.push={push!r}; expected one of {PUSH}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.push = push
        self.weights_dir = Path(weights_dir) if weights_dir else Path(tempfile.mkdtemp(prefix="unveil-vllm-push-"))
        self.timeout_s = float(timeout_s)
        self.max_workers = int(max_workers)
        self.api_key = os.environ.get(api_key_env)  # from the environment only, never in a config
        self._step: int | None = None
        self._adapter: str | None = None

    # --- HTTP -----------------------------------------------------------------------------------
    def post(self, path: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base_url + path, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise RuntimeError(f"vLLM server {self.base_url}{path}: HTTP {e.code}: {detail}") from e
        return json.loads(raw) if raw.strip() else {}

    def served_model(self) -> str:
        if self._adapter:
            return self._adapter
        if self.model is None:
            with urllib.request.urlopen(self.base_url + "/v1/models", timeout=self.timeout_s) as r:
                self.model = json.loads(r.read())["data"][0]["id"]
        return self.model

    # --- weights --------------------------------------------------------------------------------
    def sync(self, backbone, step: int) -> None:
        if self._step is None or step == self._step or self.push == "none":
            self._step = step  # the first rollout samples from what the server loaded
            return
        if self.push == "lora":
            self._push_lora(backbone, step)
        else:
            save_weights(backbone.model, self.weights_dir)
            self.post(
                "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(self.weights_dir)}}
            )
            # cached prompt keys / values and image embeddings were computed by the old weights (without the
            # encoder reset, vLLM 0.32's next image request fails: "Encoder cache miss")
            self.post("/reset_prefix_cache", {})
            self.post("/reset_encoder_cache", {})
        self._step = step

    def _push_lora(self, backbone, step: int) -> None:
        if not hasattr(backbone.model, "peft_config"):
            raise ValueError("stage.rollout.push=lora needs a LoRA policy (peft=lora); use push=weights")
        folder = self.weights_dir / f"step{step}"
        backbone.model.save_pretrained(folder)
        name = f"unveil-step{step}"
        self.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)})
        if self._adapter:
            self.post("/v1/unload_lora_adapter", {"lora_name": self._adapter})
        self._adapter = name

    # --- sampling -------------------------------------------------------------------------------
    def _request(self, backbone, sample, g, max_new_tokens, temperature, top_p, top_k) -> list[tuple[list, list]]:
        body = {
            "model": self.served_model(),
            "n": g,
            "max_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k or -1,
            "repetition_penalty": 1.0,
            "skip_special_tokens": False,
            "return_tokens_as_token_ids": True,
        }
        if sample.images:
            body.update(messages=chat_messages(backbone, sample), logprobs=True, top_logprobs=0)
            body.update(add_generation_prompt=True)
            choices = self.post("/v1/chat/completions", body)["choices"]
            return [_chat_choice(c) for c in sorted(choices, key=lambda c: c["index"])]
        body.update(prompt=prompt_text(backbone, sample), logprobs=0, add_special_tokens=False)
        choices = self.post("/v1/completions", body)["choices"]
        return [_completion_choice(c) for c in sorted(choices, key=lambda c: c["index"])]

    def sample(
        self, backbone, batch, num_generations, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, share_prompt=True
    ) -> Sampled:
        samples = batch["samples"]
        args = (num_generations, max_new_tokens, temperature, top_p, top_k)
        with ThreadPoolExecutor(max(1, min(self.max_workers, len(samples)))) as pool:
            per_prompt = list(pool.map(lambda s: self._request(backbone, s, *args), samples))
        rows, logps = [], []
        for i, choices in enumerate(per_prompt):
            if len(choices) != num_generations:
                raise RuntimeError(
                    f"vLLM server returned {len(choices)} completions for prompt {i}, not {num_generations}"
                )
            for ids, lps in choices:
                rows.append(ids)
                logps.append(lps)
        tok = backbone.tokenizer
        s = pad_completions(rows, logps, tok.eos_token_id, tok.pad_token_id)
        s.texts = decode(tok, s.completion_ids.masked_fill(s.completion_mask == 0, tok.pad_token_id))
        return s


def _token_id(token: str) -> int:
    """``token_id:123`` (``return_tokens_as_token_ids``) -> 123."""
    if not token.startswith("token_id:"):
        raise RuntimeError(
            f"vLLM server returned token {token!r}: start it with a vLLM that honours return_tokens_as_token_ids"
        )
    return int(token.split(":", 1)[1])


def _completion_choice(c: dict) -> tuple[list[int], list[float]]:
    lp = c["logprobs"]
    return [_token_id(t) for t in lp["tokens"]], [
        float("nan") if x is None else float(x) for x in lp["token_logprobs"]
    ]


def _chat_choice(c: dict) -> tuple[list[int], list[float]]:
    content = (c.get("logprobs") or {}).get("content") or []
    return [_token_id(t["token"]) for t in content], [float(t["logprob"]) for t in content]
