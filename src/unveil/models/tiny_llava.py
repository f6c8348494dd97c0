"""A tiny LLaVA (SigLIP vision tower + projector + Llama) built in code from a config.

It is a real ``LlavaForConditionalGeneration``: generate() with KV cache, save_pretrained /
from_pretrained, attentions and PEFT all work as for a full-size checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TinyLlavaSpec:
    vision: str = "conv"  # conv (learns in CPU minutes) | siglip (a ViT, like LLaVA's, data-hungry)
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 2
    vision_heads: int = 4
    hidden: int = 160
    layers: int = 3
    heads: int = 4
    intermediate: int = 384
    max_positions: int = 512
    vocab_size: int = 384  # of the locally trained tokenizer
    # number tokens start from their value's Fourier code (src/unveil/models/coord_features.py)
    number_code: bool = True
    # conv tower only: K extra image tokens after the patches, slot k pooling box k in reading
    # order (src/unveil/models/conv_vision.py); 0 keeps the plain grid of patch tokens
    slot_tokens: int = 0


def build_processor(tokenizer, spec: TinyLlavaSpec):
    from transformers import LlavaProcessor, SiglipImageProcessor

    image_processor = SiglipImageProcessor(
        size={"height": spec.image_size, "width": spec.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=spec.slot_tokens,
        chat_template=tokenizer.chat_template,
    )


def build_model(tokenizer, spec: TinyLlavaSpec, seed: int = 0):
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    if spec.vision == "conv":
        from unveil.models.conv_vision import ConvVisionConfig

        vision = ConvVisionConfig(
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            hidden_size=spec.vision_hidden,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_heads,
            slot_tokens=spec.slot_tokens,
        )
    elif spec.slot_tokens:
        raise ValueError(f"model.spec.slot_tokens needs model.spec.vision=conv, got {spec.vision!r}")
    elif spec.vision == "siglip":
        vision = SiglipVisionConfig(
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_hidden * 2,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_heads,
            image_size=spec.image_size,
            patch_size=spec.patch_size,
        )
    else:
        raise ValueError(f"model.spec.vision must be conv or siglip, got {spec.vision!r}")
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(spec.image_size // spec.patch_size) ** 2 + spec.slot_tokens,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
        if spec.number_code:
            from unveil.models.coord_features import init_number_rows

            init_number_rows(model, tokenizer, seed=seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
