"""Reward heads, one file each, and the composite that weights and normalises them."""

from unveil.rewards.base import RewardHead, Rollout

__all__ = ["RewardHead", "Rollout", "build_rewards"]


def build_rewards(cfg, backbone=None, vocab=None):
    """Composite reward from the ``reward`` config group (a dict of heads)."""
    from unveil.rewards.composite import build_composite

    return build_composite(cfg, backbone=backbone, vocab=vocab)
