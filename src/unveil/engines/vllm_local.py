"""vLLM colocated: an ``LLM`` in the training process samples the rollouts.

Built on the first rollout from the backbone saved to ``workdir`` (LoRA merged). After each
optimiser step the policy's merged weights are saved to ``workdir/push`` and reloaded into it in
place (``reload_weights``, vLLM's RL path); between rollouts it sleeps (``enable_sleep_mode``,
freeing its KV cache) where the platform supports it (CUDA; not vLLM's CPU build). vLLM is imported
here only, when the engine is built."""

from __future__ import annotations

import tempfile
from pathlib import Path

from unveil.engines.base import RolloutEngine, Sampled, pad_completions
from unveil.engines.prompts import save_weights, vllm_prompts
from unveil.models.generation import decode


class VLLMEngine(RolloutEngine):
    def __init__(
        self,
        workdir: str | None = None,
        gpu_memory_utilization: float = 0.3,
        sleep: bool = True,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        llm_kwargs: dict | None = None,
    ):
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="unveil-vllm-"))
        # processed_logprobs: the log-probs of the distribution sampled from (after temperature / top-k / top-p),
        # the one the trainer's log-probs (temperature-scaled) are compared with
        self.kw = dict(gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, seed=seed)
        self.kw.update(logprobs_mode="processed_logprobs", **(llm_kwargs or {}))
        if max_model_len:
            self.kw["max_model_len"] = int(max_model_len)
        self.sleep_mode = bool(sleep)
        self.llm = None
        self._step: int | None = None

    def _build(self, backbone) -> None:
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as e:
            raise ImportError(
                "stage.rollout=vllm needs vLLM in this environment: see README, 'Rollouts with vLLM'"
            ) from e
        backbone.save(self.workdir)
        self.sleep_mode = self.sleep_mode and bool(current_platform.is_sleep_mode_available())
        self.llm = LLM(model=str(self.workdir), enable_sleep_mode=self.sleep_mode, **self.kw)

    def sync(self, backbone, step: int) -> None:
        if self.llm is None:
            self._build(backbone)  # built from the current weights: nothing to push
        elif step != self._step:
            self._wake()
            # through a file, as the server engine: vLLM's engine core runs in its own process, and its RPC
            # cannot carry the tensors (vLLM 0.32: "cannot pickle memoryview objects")
            push = save_weights(backbone.model, self.workdir / "push")
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(push)})
            # cached prompt keys / values and image embeddings were computed by the old weights
            self.llm.reset_prefix_cache()
            self.llm.llm_engine.reset_encoder_cache()
        self._step = step

    def _wake(self) -> None:
        if self.sleep_mode and getattr(self, "_asleep", False):
            self.llm.wake_up()
            self._asleep = False

    def sample(
        self, backbone, batch, num_generations, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, share_prompt=True
    ) -> Sampled:
        from vllm import SamplingParams

        if self.llm is None:
            self.sync(backbone, -1)
        self._wake()
        tok = backbone.tokenizer
        params = SamplingParams(
            n=num_generations,
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k or -1,
            logprobs=0,  # the sampled token's own log-prob
            repetition_penalty=1.0,
            skip_special_tokens=False,
            detokenize=False,
        )
        outs = self.llm.generate(vllm_prompts(backbone, batch["samples"]), params, use_tqdm=False)
        rows, logps = [], []
        for o in outs:  # prompt-major, G completions each
            for c in o.outputs:
                rows.append(list(c.token_ids))
                logps.append([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
        s = pad_completions(rows, logps, tok.eos_token_id, tok.pad_token_id)
        s.texts = decode(tok, s.completion_ids.masked_fill(s.completion_mask == 0, tok.pad_token_id))
        if self.sleep_mode:
            self.llm.sleep(level=1)  # weights kept on the host, KV cache freed for the update
            self._asleep = True
        return s

    def close(self) -> None:
        self.llm = None
