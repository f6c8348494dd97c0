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


def required(key: str, hint: str = "") -> None:
    """``${unveil.required:model.init_from,<hint>}``: a value that must be given on the command line.

    (``???`` cannot do this in an experiment file: OmegaConf keeps the earlier value when merging
    a missing one over it.)
    """
    raise ValueError(f"{key} must be set" + (f": {hint}" if hint else "") + f" (add {key}=... to the command line)")


def register() -> None:
    if not OmegaConf.has_resolver("unveil.root"):
        OmegaConf.register_new_resolver("unveil.root", project_root)
    if not OmegaConf.has_resolver("unveil.required"):
        OmegaConf.register_new_resolver("unveil.required", required)
    if not OmegaConf.has_resolver("unveil.wandb_offline"):
        OmegaConf.register_new_resolver("unveil.wandb_offline", lambda: not os.environ.get("WANDB_API_KEY"))
    from unveil.utils import cluster, wandb_run

    for name, fn in {
        "unveil.devices_per_node": cluster.devices_per_node,
        "unveil.study_storage": cluster.study_storage,
        "unveil.study_seed": cluster.study_seed,
        "unveil.wandb_group": wandb_run.sweep_group,
        "unveil.wandb_name": wandb_run.job_name,
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register()
