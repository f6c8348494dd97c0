"""Synthetic abnormality data set: the embedded default (docs/architecture.md#the-embedded-default)."""

from unveil.data.synthetic.generator import SyntheticConfig, generate

__all__ = ["SyntheticConfig", "generate", "make"]


def make(cfg, root, progress: bool = True):
    """Generate the set ``cfg`` describes into ``root`` (a no-op when its fingerprint is there):
    ``SyntheticConfig`` (single-image studies) or ``MultiImageConfig`` (Med-MIM-style questions)."""
    from unveil.data.synthetic.multi_image import MultiImageConfig, generate_multi_image

    if isinstance(cfg, MultiImageConfig):
        return generate_multi_image(cfg, root, progress=progress)
    if not isinstance(cfg, SyntheticConfig):
        raise ValueError(f"data.synthetic: expected a SyntheticConfig or MultiImageConfig (_target_), got {cfg!r}")
    return generate(cfg, root, progress=progress)
