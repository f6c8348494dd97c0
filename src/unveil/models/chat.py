"""Turn Sample messages into the prompt text a backbone's chat template expects."""

from __future__ import annotations

import re

from unveil.data.schema import IMAGE_PLACEHOLDER

_SPLIT = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)})")


def supports_virtual_user(backbone) -> bool:
    """Whether the backbone's chat template renders STLLaVA-Med's virtual user with role tokens of its
    own (every template in :mod:`unveil.models.chat_templates` and the tiny model's do; a checkpoint's
    own template usually does not: ``model.chat_template=<name>`` installs ours)."""
    templates = [getattr(backbone.tokenizer, "chat_template", None)]
    if backbone.structured_chat:
        templates.insert(0, getattr(backbone.processor, "chat_template", None))
    t = next((t for t in templates if t), None)
    return isinstance(t, str) and "add_virtual_user_prompt" in t


def structured(messages: list[dict], virtual_user: bool = True) -> list[dict]:
    """String content with <image> placeholders -> HF content lists ({"type": "image"}, text).

    ``virtual_user=False``: the template has no virtual-user role, so STLLaVA-Med's virtual user is
    a user to it (only the loss mask differs).
    """
    out = []
    for m in messages:
        parts = []
        for piece in _SPLIT.split(m["content"]):
            if piece == IMAGE_PLACEHOLDER:
                parts.append({"type": "image"})
            elif piece.strip():
                parts.append({"type": "text", "text": piece.strip("\n") if parts else piece.lstrip("\n")})
        role = "user" if m["role"] == "virtual_user" and not virtual_user else m["role"]
        out.append({"role": role, "content": parts})
    return out


def render(
    backbone, messages: list[dict], add_generation_prompt: bool = False, add_virtual_user_prompt: bool = False
) -> str:
    """The chat text of ``messages``; ``add_virtual_user_prompt`` ends it with the virtual user's role
    tag (templates that support it), as ``add_generation_prompt`` ends it with the assistant's."""
    extra = {"add_virtual_user_prompt": True} if add_virtual_user_prompt else {}
    if backbone.structured_chat:
        return backbone.processor.apply_chat_template(
            structured(messages, supports_virtual_user(backbone)),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **extra,
        )
    return backbone.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
    )
