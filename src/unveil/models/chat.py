"""Turn Sample messages into the prompt text a backbone's chat template expects."""

from __future__ import annotations

import re

from unveil.data.schema import IMAGE_PLACEHOLDER

_SPLIT = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)})")


def structured(messages: list[dict]) -> list[dict]:
    """String content with <image> placeholders -> HF content lists ({"type": "image"}, text).

    The virtual user of STLLaVA-Med is a user to the template; only the loss mask differs.
    """
    out = []
    for m in messages:
        parts = []
        for piece in _SPLIT.split(m["content"]):
            if piece == IMAGE_PLACEHOLDER:
                parts.append({"type": "image"})
            elif piece.strip():
                parts.append({"type": "text", "text": piece.strip("\n") if parts else piece.lstrip("\n")})
        role = "user" if m["role"] == "virtual_user" else m["role"]
        out.append({"role": role, "content": parts})
    return out


def render(backbone, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if backbone.structured_chat:
        return backbone.processor.apply_chat_template(
            structured(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    return backbone.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
