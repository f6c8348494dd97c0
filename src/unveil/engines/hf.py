"""The default engine: the policy samples its own completions (``generate``'s lean loop)."""

from __future__ import annotations

from unveil.engines.base import RolloutEngine, Sampled
from unveil.models.generation import generate


class HFEngine(RolloutEngine):
    """Today's sampling, unchanged: the exact on-policy reference. No sampler log-probs are
    reported (the sampler is the policy), so the importance-sampling correction is exactly 1.
    ``do_sample=False``: greedy completions (evaluation-style rollouts)."""

    def __init__(self, do_sample: bool = True):
        self.do_sample = bool(do_sample)

    def sample(
        self, backbone, batch, num_generations, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, share_prompt=True
    ) -> Sampled:
        out = generate(
            backbone,
            batch,
            max_new_tokens=max_new_tokens,
            do_sample=self.do_sample,
            num_return_sequences=num_generations,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            share_prompt=share_prompt,
        )
        return Sampled(out["completion_ids"], out["completion_mask"], out["texts"], None)
