"""The weights of an export: the run's merged ``backbone/`` copied, or its LoRA adapter written by PEFT."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

from unveil.report.collect import ReportRun


def copy_merged(run: ReportRun, out: Path) -> str | None:
    """Copy ``<run>/backbone`` (what :meth:`Backbone.save` wrote: LoRA merged, in the dtype the model
    was loaded in) into ``out``. Returns the base the run started from, for the card."""
    src = run.path / "backbone"
    if not (src / "config.json").exists():
        raise FileNotFoundError(
            f"{src}: no saved model (config.json); only a finished training run (python -m unveil.train) has one"
        )
    shutil.copytree(src, out, dirs_exist_ok=True)
    return base_of(run.run.config.get("model") or {}, strict=False) if run.run.config else None


def base_of(model_cfg: dict, strict: bool = True) -> str | None:
    """Where the run's base model loads from: the saved model ``model.init_from`` names (a run's
    ``backbone/`` or a model dir), or ``model.name_or_path`` (``model=hf``). A model built in
    code has none: an error when ``strict``, else None."""
    from unveil.models.factory import loads_a_checkpoint, saved_dir

    init_from = model_cfg.get("init_from")
    if init_from:
        saved = saved_dir(init_from)
        if saved is not None:
            return str(saved.resolve())
        why = f"model.init_from={init_from} is not a saved model dir here (a .ckpt holds no loadable base)"
    elif loads_a_checkpoint(model_cfg) and model_cfg.get("name_or_path"):
        return str(model_cfg["name_or_path"])
    else:
        why = f"model._target_={model_cfg.get('_target_')} builds the base in code (no directory to load it from)"
    if strict:
        raise ValueError(
            f"an adapter needs a base to load onto, and this run has none: {why}. Export it merged (without "
            "--adapter-only), or train LoRA from model.init_from=<run dir> or model=hf"
        )
    return None


def is_lora(peft_cfg) -> bool:
    """Whether a run's ``peft`` config is LoRA (``peft=lora``: PEFT's LoraConfig)."""
    return str((peft_cfg or {}).get("_target_", "")).endswith("LoraConfig")


def _check_base(model: torch.nn.Module, saved: dict | None) -> None:
    """The checkpoint's fingerprint of its frozen base against the base loaded now (the resume check
    of :class:`unveil.stages.base.StageModule`, on a holder with the same ``model.`` names)."""
    from unveil.stages.base import StageModule

    class _Holder(torch.nn.Module):
        _frozen_keys = StageModule._frozen_keys
        frozen_fingerprint = StageModule.frozen_fingerprint
        _check_frozen_base = StageModule._check_frozen_base

        def __init__(self, m):
            super().__init__()
            self.model = m

    if saved is not None:
        _Holder(model)._check_frozen_base(saved)


def write_adapter(run: ReportRun, out: Path) -> str:
    """The LoRA adapter of ``<run>/checkpoints/last.ckpt`` on the base rebuilt as training built it
    (:func:`unveil.models.factory.build_backbone` with the run's ``model`` and ``peft``), saved with
    PEFT's ``save_pretrained`` (its ``base_model_name_or_path``: the base), with the processor."""
    import unveil.utils.resolvers  # noqa: F401  (the ${unveil.*} resolvers the model config may use)
    from unveil.eval.old_configs import upgrade
    from unveil.models.factory import build_backbone

    cfg = upgrade(OmegaConf.create(run.run.config or {}))  # runs of the registry era read the same way
    if not is_lora(cfg.get("peft")):
        raise ValueError(f"{run.path}: trained without LoRA (peft=none): no adapter; export it merged")
    base = base_of(OmegaConf.to_container(cfg.model, resolve=False))
    ckpt = run.path / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt}: the adapter comes from the run's last checkpoint, which is not there")
    bb = build_backbone(cfg.model, peft=cfg.peft)
    state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    _check_base(bb.model, state.get("frozen_weights"))
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    _, unexpected = bb.model.load_state_dict(weights, strict=False)
    trainable = {n for n, p in bb.model.named_parameters() if p.requires_grad}
    if unexpected or trainable - set(weights):
        raise RuntimeError(
            f"{ckpt}: its weights do not fit the LoRA model rebuilt from the run's config "
            f"(not in the checkpoint: {sorted(trainable - set(weights))[:3]}, unexpected: {unexpected[:3]})"
        )
    for peft_cfg in bb.model.peft_config.values():
        peft_cfg.base_model_name_or_path = base
    bb.model.save_pretrained(out)
    bb.processor.save_pretrained(out)
    (out / "unveil_backbone.txt").write_text(
        f"box_format={bb.box_format.name}\nstructured_chat={bb.structured_chat}\n"
    )
    return base
