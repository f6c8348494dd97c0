"""What the vLLM engines share: the prompts as vLLM takes them, the policy's weights as a checkpoint.

The prompt text is the one the trainer's :class:`unveil.data.collate.PromptCollator` renders (the
backbone's chat template, image placeholders unexpanded), so vLLM's processor expands it into the
same prompt ids the trainer scores the completions under."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import torch

from unveil.data.collate import backbone_messages
from unveil.data.images import load_image
from unveil.models.chat import structured, supports_virtual_user


def prompt_text(backbone, sample) -> str:
    """The rendered prompt of ``sample``, as the PromptCollator renders it."""
    msgs = backbone_messages(backbone, sample)[: len(sample.prompt_messages)]
    return backbone.render(msgs, add_generation_prompt=True)


def vllm_prompts(backbone, samples) -> list[dict]:
    """vLLM ``LLM.generate`` inputs: ``{"prompt": text, "multi_modal_data": {"image": [...]}}``."""
    out = []
    for s in samples:
        p = {"prompt": prompt_text(backbone, s)}
        if s.images:
            p["multi_modal_data"] = {"image": [load_image(x) for x in s.images]}
        out.append(p)
    return out


def data_url(path) -> str:
    buf = io.BytesIO()
    load_image(path).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_messages(backbone, sample) -> list[dict]:
    """OpenAI chat messages of the prompt, images (in order) as PNG data URLs: for a server, whose
    chat template (the saved backbone's) renders them as ``prompt_text`` does."""
    msgs = structured(
        backbone_messages(backbone, sample)[: len(sample.prompt_messages)], supports_virtual_user(backbone)
    )
    images = iter(sample.images)
    for m in msgs:
        m["content"] = [
            {"type": "image_url", "image_url": {"url": data_url(next(images))}} if p["type"] == "image" else p
            for p in m["content"]
        ]
    return msgs


@torch.no_grad()
def policy_state(model) -> dict[str, torch.Tensor]:
    """The policy's full weights under the base model's names (LoRA merged in, then unmerged), on the CPU."""
    if hasattr(model, "merge_adapter"):  # peft: merge, read, unmerge (as TRL's weight sync)
        model.merge_adapter()
        try:
            base = model.get_base_model()
            state = {
                k.replace(".base_layer", ""): v.detach().cpu().clone()
                for k, v in base.state_dict().items()
                if "lora_" not in k
            }
        finally:
            model.unmerge_adapter()
        return state
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_weights(model, folder: str | Path) -> Path:
    """The policy's merged weights as ``model.safetensors`` in ``folder`` (what vLLM reloads from)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in policy_state(model).items()}
    seen: dict[int, str] = {}
    for k in list(state):  # tied weights (embeddings / lm_head) are saved once, as save_pretrained does
        ptr = state[k].data_ptr()
        if ptr in seen:
            state[k] = state[k].clone()
        seen[ptr] = k
    save_file(state, str(folder / "model.safetensors"))
    return folder
