"""Chat templates that mirror the real ones of each backbone family (Jinja, HF style).

Used by the tiny models built in code (:mod:`unveil.models.tiny_hf`) and, through
``model.chat_template=<name>``, to replace a checkpoint's own template where it does not fit
training (llava-hf's LLaVA-1.5 template has no ``</s>`` after answers) or is missing
(LLaVA-Med and Mantis conversions). Every template accepts content as a string or as an HF
content list (``{"type": "image"}`` / ``{"type": "text", "text": ...}``).

Every template also renders STLLaVA-Med's **virtual user** (role ``virtual_user``) with role
tokens of its own, and takes ``add_virtual_user_prompt`` (the virtual user's role tag, as
``add_generation_prompt`` is the assistant's): the loss mask then trains the question and the
end-of-turn token after that tag, as the official ``preprocess_v1_sq2`` does ("VUSER: Q</s>",
"VUSER:" masked). The role tag follows each family's style: ``VUSER:`` in the Vicuna-style and
Mistral templates (the official name, conv ``v1_sq``), ``<|im_start|>vuser`` in ChatML,
``Vuser:`` in Idefics3's. docs/methods.md#stllava-med.
"""

from __future__ import annotations

_CONTENT = (  # content as a string or an HF content list; images rendered by IMG
    "{%- macro content(c, img) -%}"
    "{%- if c is string -%}{{ c }}"
    "{%- else -%}{%- for p in c -%}"
    "{%- if p['type'] == 'image' or 'image' in p -%}{{ img }}"
    "{%- elif p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# LLaVA-1.5 as trained (conv_llava_v1 / vicuna_v1): "SYS USER: <image>\nQ ASSISTANT: A</s>USER: ...".
# (llava-hf's own template drops the </s> after answers, so a model tuned with it never learns
# to stop; conf/model/llava15.yaml installs this one instead.) A virtual-user turn as STLLaVA-Med's
# conv v1_sq renders it: "...A</s>VUSER: Q</s> ASSISTANT: A2</s>" (the space is the turn separator).
LLAVA15_TEMPLATE = _CONTENT + (
    "{%- set ns = namespace(vu=false) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}{{ content(messages[0]['content'], '') ~ ' ' }}"
    "{%- else -%}{{ '" + LLAVA_SYSTEM.replace("'", "\\'") + " ' }}{%- endif -%}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if ns.vu and m['role'] != 'virtual_user' -%}{{ ' ' }}{%- endif -%}"
    "{%- set ns.vu = m['role'] == 'virtual_user' -%}"
    "{%- if m['role'] == 'assistant' -%}{{ 'ASSISTANT: ' ~ content(m['content'], '') ~ '</s>' }}"
    "{%- elif m['role'] == 'virtual_user' -%}{{ 'VUSER: ' ~ content(m['content'], '<image>\\n') ~ '</s>' }}"
    "{%- else -%}{{ 'USER: ' ~ content(m['content'], '<image>\\n') ~ ' ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ (' ' if ns.vu else '') ~ 'ASSISTANT:' }}"
    "{%- elif add_virtual_user_prompt -%}{{ (' ' if ns.vu else '') ~ 'VUSER:' }}{%- endif -%}"
)

# LLaVA-Med v1.5 (Mistral; conv_mode mistral_instruct): "[INST] <image>\nQ [/INST] A </s>[INST] ...".
# A virtual-user turn (no official Mistral form; STLLaVA-Med trained Vicuna): "[INST] VUSER: Q </s>",
# its [/INST] put before the answer that follows.
LLAVA_MED_TEMPLATE = _CONTENT + (
    "{%- set ns = namespace(sys='', vu=false) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.sys = content(m['content'], '') ~ ' ' -%}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{ (' [/INST]' if ns.vu else '') ~ ' ' ~ content(m['content'], '') ~ ' </s>' }}"
    "{%- elif m['role'] == 'virtual_user' -%}"
    "{{ '[INST] VUSER: ' ~ ns.sys ~ content(m['content'], '<image>\\n') ~ ' </s>' }}{%- set ns.sys = '' -%}"
    "{%- else -%}{{ '[INST] ' ~ ns.sys ~ content(m['content'], '<image>\\n') ~ ' [/INST]' }}{%- set ns.sys = '' -%}"
    "{%- endif -%}"
    "{%- if m['role'] != 'system' -%}{%- set ns.vu = m['role'] == 'virtual_user' -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and ns.vu -%}{{ ' [/INST]' }}"
    "{%- elif add_virtual_user_prompt -%}{{ '[INST] VUSER:' }}{%- endif -%}"
)

# Mantis-LLaVA (conv_mllava_v1, SINGLE style with sep </s>): "SYS</s>USER: Q</s>ASSISTANT: A</s>".
MANTIS_LLAVA_TEMPLATE = _CONTENT + (
    "{%- if messages and messages[0]['role'] == 'system' -%}{{ content(messages[0]['content'], '') ~ '</s>' }}"
    "{%- else -%}{{ '" + LLAVA_SYSTEM.replace("'", "\\'") + "</s>' }}{%- endif -%}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if m['role'] == 'assistant' -%}{{ 'ASSISTANT: ' ~ content(m['content'], '') ~ '</s>' }}"
    "{%- elif m['role'] == 'virtual_user' -%}{{ 'VUSER: ' ~ content(m['content'], '<image>') ~ '</s>' }}"
    "{%- else -%}{{ 'USER: ' ~ content(m['content'], '<image>') ~ '</s>' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}"
    "{%- elif add_virtual_user_prompt -%}{{ 'VUSER:' }}{%- endif -%}"
)

# Qwen2-VL and Qwen2.5-VL (identical up to the default system prompt).
_QWEN_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n__SYSTEM__<|im_end|>\\n' }}{%- endif -%}"
    "{{ '<|im_start|>' ~ ('vuser' if message['role'] == 'virtual_user' else message['role']) ~ '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' or 'image' in c or 'image_url' in c -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{ 'Picture ' ~ image_count.value ~ ': ' }}{%- endif -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'text' in c -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- elif add_virtual_user_prompt -%}{{ '<|im_start|>vuser\\n' }}{%- endif -%}"
)
QWEN2_VL_TEMPLATE = _QWEN_TEMPLATE.replace("__SYSTEM__", "You are a helpful assistant.")
QWEN25_VL_TEMPLATE = QWEN2_VL_TEMPLATE

# Idefics3 (Llama-3 text) and SmolVLM: "User:<image>Q<end_of_utterance>\nAssistant: A<end_of_utterance>\n".
_IDEFICS_TEMPLATE = (
    "{{ '__BOS__' }}{%- for message in messages -%}"
    "{{ 'Vuser' if message['role'] == 'virtual_user' else message['role'] | capitalize }}"
    "{%- if message['content'] is not string and message['content'][0]['type'] == 'image' -%}{{ ':' }}"
    "{%- else -%}{{ ': ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for line in message['content'] -%}"
    "{%- if line['type'] == 'text' -%}{{ line['text'] }}"
    "{%- elif line['type'] == 'image' -%}{{ '<image>' }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_utterance>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}"
    "{%- elif add_virtual_user_prompt -%}{{ 'Vuser:' }}{%- endif -%}"
)
IDEFICS3_TEMPLATE = _IDEFICS_TEMPLATE.replace("__BOS__", "<|begin_of_text|>")
SMOLVLM_TEMPLATE = _IDEFICS_TEMPLATE.replace("__BOS__", "<|im_start|>")

CHAT_TEMPLATES = {
    "llava15": LLAVA15_TEMPLATE,
    "llava_med": LLAVA_MED_TEMPLATE,
    "mantis": MANTIS_LLAVA_TEMPLATE,
    "qwen2_vl": QWEN2_VL_TEMPLATE,
    "qwen25_vl": QWEN25_VL_TEMPLATE,
    "idefics3": IDEFICS3_TEMPLATE,
    "smolvlm": SMOLVLM_TEMPLATE,
}


def resolve_chat_template(name_or_template: str | None) -> str | None:
    """A CHAT_TEMPLATES name, or a Jinja template given literally (or None)."""
    if name_or_template is None:
        return None
    if name_or_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name_or_template]
    if "{%" not in name_or_template and "{{" not in name_or_template:
        raise ValueError(f"unknown chat template {name_or_template!r}; known: {sorted(CHAT_TEMPLATES)}")
    return name_or_template
