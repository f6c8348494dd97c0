"""Backbones: the factory, the tiny model built in code, PEFT and freezing."""

from unveil.models.factory import Backbone, build_backbone

__all__ = ["Backbone", "build_backbone"]
