"""Lightning modules, one per training stage: sft, ppo, grpo, dpo."""
