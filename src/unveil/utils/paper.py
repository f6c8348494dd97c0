"""Paper presets and logged deviations of an experiment file (docs/fidelity.md).

An experiment file (``conf/experiment/*.yaml``) may carry

- ``paper``: the published recipe. ``paper.values`` maps config paths to the paper's values
  (``stage.optim.lr: 1.0e-7``, ``peft.r: 128``, ...); they replace the experiment's own values when
  the preset applies: ``paper.apply: auto`` (default) on a real backbone (``model._target_`` is
  ``unveil.models.factory.hf``: ``model=llava_med``, ``model=qwen2_vl``, ``model=hf ...``), never
  on the tiny models built in code, whose values stay sized for a CPU; ``true`` / ``false`` force
  it. A path given on the command line keeps the command line's value (and the log says so).
  The other keys of ``paper`` (``source``, ``judge``, ...) are descriptive.
- ``deviations``: where the run departs from the paper, each logged with ``log.warning`` when the run
  starts. An entry is a string, or ``{text: ..., when: {<config path>: <value>, ...}}``, logged
  only while every path has that value (e.g. a judge deviation only while the offline judge is on).

When a preset exists but does not apply, the values that differ from the paper's are logged as
deviations too, so a tiny run says how far it is from the published one.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("unveil.train")

REAL_BACKBONE = "unveil.models.factory.hf"  # what the `when:` conditions of the experiment files name
_MISSING = object()


def is_real_backbone(cfg: DictConfig) -> bool:
    from unveil.models.factory import loads_a_checkpoint

    return loads_a_checkpoint(cfg.get("model"))


def command_line_paths() -> set[str]:
    """Config paths the command line set (``a.b=1``, ``+a.b=1``, ``++a.b=1``); empty outside a Hydra run."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except Exception:  # composed outside a Hydra run (a notebook): nothing to protect
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in task if "=" in o}


def preset_applies(cfg: DictConfig) -> bool:
    paper = cfg.get("paper")
    if not paper or not paper.get("values"):
        return False
    mode = paper.get("apply", "auto")
    if mode not in ("auto", True, False):
        raise ValueError(f"paper.apply must be auto, true or false, got {mode!r}")
    return is_real_backbone(cfg) if mode == "auto" else bool(mode)


def _select(cfg: DictConfig, path: str) -> Any:
    v = OmegaConf.select(cfg, path, default=_MISSING, throw_on_missing=False)
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def apply_paper_preset(cfg: DictConfig, given: set[str] | None = None) -> dict[str, Any]:
    """Set ``paper.values`` into ``cfg`` (in place) when the preset applies; returns {path: value} set.
    Paths in ``given`` (default: the command line's) keep their value."""
    if not preset_applies(cfg):
        return {}
    given = command_line_paths() if given is None else given
    applied = {}
    with open_dict(cfg):
        for path, value in cfg.paper["values"].items():
            if path in given:
                log.warning(
                    "paper preset: %s=%s from the command line (the paper's: %s)", path, _select(cfg, path), value
                )
                continue
            OmegaConf.update(cfg, path, value, merge=False, force_add=True)
            applied[path] = value
    log.info("paper preset of %s applied (%s): %s", cfg.get("task_name"), cfg.paper.get("source", "?"), applied)
    return applied


def deviations(cfg: DictConfig) -> list[str]:
    """The deviations this run has: the experiment's list (``when`` conditions checked) and, when the
    paper preset does not apply, each published value the run does not use."""
    out = []
    for d in cfg.get("deviations") or []:
        if isinstance(d, str):
            out.append(d)
            continue
        when = d.get("when") or {}
        if all(_select(cfg, p) == v for p, v in when.items()):
            out.append(str(d["text"]))
    paper = cfg.get("paper")
    if paper and paper.get("values") and not preset_applies(cfg):
        differ = [
            f"{p}={_select(cfg, p)} (paper: {v})"
            for p, v in paper["values"].items()
            if _select(cfg, p) != (OmegaConf.to_container(v) if OmegaConf.is_config(v) else v)
        ]
        if differ:
            out.append(
                "paper hyper-parameters not applied (paper.apply="
                f"{paper.get('apply', 'auto')}, model {cfg.model.get('_target_')}): " + "; ".join(differ)
            )
    return out


def log_deviations(cfg: DictConfig) -> list[str]:
    """``log.warning`` each deviation, prefixed with the experiment; returns them."""
    found = deviations(cfg)
    for d in found:
        log.warning("deviates from the paper [%s]: %s", cfg.get("task_name", "?"), d)
    return found
