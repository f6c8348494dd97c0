"""Rollout engines: what samples an RL stage's completions (``stage.rollout``, a ``_target_``).

- :class:`unveil.engines.hf.HFEngine` (default): the policy itself, ``generate``'s lean sampling
  loop over the shared prompt cache. Exactly on-policy: it reports no sampler log-probs, so the
  importance-sampling correction is 1.
- :class:`unveil.engines.vllm_local.VLLMEngine`: vLLM's ``LLM`` in the training process, weights
  loaded into it after each optimiser step, asleep between rollouts where the platform can.
- :class:`unveil.engines.vllm_server.VLLMServerEngine`: an OpenAI-compatible ``vllm serve``
  reached over HTTP; weights pushed after each step, or LoRA adapters hot-loaded.

vLLM is never a dependency: no vLLM release installs next to this project's pins (torch 2.14.1,
transformers 5.23.0), so it lives in its own environment (README, "Rollouts with vLLM"); the vLLM
engines import it only when built.
"""

from unveil.engines.base import RolloutEngine, Sampled

__all__ = ["RolloutEngine", "Sampled"]
