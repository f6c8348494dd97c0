"""Synthetic abnormality data set: the embedded default (DESIGN 2.6)."""

from unveil.data.synthetic.generator import SyntheticConfig, generate

__all__ = ["SyntheticConfig", "generate"]
