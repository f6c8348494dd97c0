"""Freezing parts of a VLM and wrapping it with LoRA (peft)."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# Attribute names of the three parts across HF VLM classes (LLaVA, Qwen2-VL, Idefics3, ...).
PARTS = {
    "vision": ("vision_tower", "visual", "vision_model"),
    "projector": ("multi_modal_projector", "connector", "merger"),
    "language": ("language_model", "text_model"),  # text_model: Idefics3 / SmolVLM
}


def _find(model: torch.nn.Module, names: tuple[str, ...]) -> list[torch.nn.Module]:
    found = []
    for name, mod in model.named_modules():
        if name.split(".")[-1] in names and not any(name.startswith(f) for f, _ in found):
            found.append((name, mod))
    return [m for _, m in found]


def apply_freeze(
    model: torch.nn.Module, vision: bool = False, projector: bool = False, language: bool = False
) -> None:
    for part, flag in (("vision", vision), ("projector", projector), ("language", language)):
        if not flag:
            continue
        mods = _find(model, PARTS[part])
        if not mods:
            raise ValueError(f"cannot freeze '{part}': none of {PARTS[part]} found in {type(model).__name__}")
        for m in mods:
            m.requires_grad_(False)
    if vision and not projector:  # a projector inside the vision tower (Qwen2-VL's visual.merger) stays trainable
        for m in _find(model, PARTS["projector"]):
            m.requires_grad_(True)


def apply_lora(model: torch.nn.Module, lcfg) -> torch.nn.Module:
    """Wrap the layers ``lcfg`` (a ``peft.LoraConfig``) targets with LoRA; modules_to_save stay fully trained."""
    from peft import get_peft_model

    model = get_peft_model(model, lcfg)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("LoRA: %d / %d parameters trainable (%.2f%%)", n_train, n_all, 100 * n_train / max(n_all, 1))
    return model


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }
