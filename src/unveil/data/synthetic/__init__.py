"""Synthetic abnormality data set: the embedded default (docs/architecture.md#the-embedded-default)."""

from unveil.data.synthetic.generator import SyntheticConfig, generate

__all__ = ["SyntheticConfig", "generate"]
