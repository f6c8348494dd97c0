"""OmegaConf resolvers used by the configs (registered once, on import)."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf


def project_root() -> str:
    """UNVEIL_ROOT if set, else the checkout this package is installed from (editable install)."""
    env = os.environ.get("UNVEIL_ROOT")
    if env:
        return env
    here = Path(__file__).resolve()
    for p in here.parents:
        if (p / "conf" / "train.yaml").exists():
            return str(p)
    return os.getcwd()


def register() -> None:
    if not OmegaConf.has_resolver("unveil.root"):
        OmegaConf.register_new_resolver("unveil.root", project_root)
    if not OmegaConf.has_resolver("unveil.wandb_offline"):
        OmegaConf.register_new_resolver("unveil.wandb_offline", lambda: not os.environ.get("WANDB_API_KEY"))


register()
