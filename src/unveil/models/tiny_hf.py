"""Tiny random models of real HF VLM architectures, with their real processor classes.

``model=tiny_<arch>`` (builder ``factory.tiny_hf``, ``model.arch=<arch>``) builds, in code and
offline, a few-hundred-thousand parameter model of the exact class a real checkpoint loads as,
plus that family's processor class around a byte-level BPE tokenizer trained locally on the data's text. The tokenizer
carries the family's special tokens and the processor a chat template that mirrors the real
one, so everything that touches prompts, image tokens, boxes and loss masks runs as it would
on the full-size model:

========== ============================================ ============================ ===========
arch       model class                                  processor                    box format
========== ============================================ ============================ ===========
llava15    LlavaForConditionalGeneration (CLIP + Llama) LlavaProcessor + CLIP        int100
qwen2_vl   Qwen2VLForConditionalGeneration              Qwen2VLProcessor             qwen2vl
qwen25_vl  Qwen2_5_VLForConditionalGeneration           Qwen2_5_VLProcessor          qwen25_abs
idefics3   Idefics3ForConditionalGeneration             Idefics3Processor (tiles)    int100
smolvlm    SmolVLMForConditionalGeneration              SmolVLMProcessor (tiles)     int100
========== ============================================ ============================ ===========

LLaVA-Med v1.5 and Mantis-LLaVA are ``llava15`` with another chat template (see
:mod:`unveil.models.chat_templates`); select one with ``model.spec.chat_template=llava_med|mantis``.

Deviations from the real checkpoints, all deliberate and small: the Idefics3 tokenizer's
``eos_token`` is ``<end_of_utterance>`` (the real one stops on it through generation_config),
and images are small (Qwen: ``min_pixels = max_pixels = image_size**2``, so a square image
becomes ``image_size x image_size`` pixels and any other its own ``smart_resize`` size, on which
Qwen2.5-VL's absolute boxes are written: :mod:`unveil.data.frames`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unveil.models.chat_templates import LLAVA_SYSTEM, resolve_chat_template

log = logging.getLogger(__name__)

ARCHS = ("llava15", "qwen2_vl", "qwen25_vl", "idefics3", "smolvlm")

# --- families ---------------------------------------------------------------------------------

_ROW_COL = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
_QWEN_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


@dataclass(frozen=True)
class Family:
    special: tuple[str, ...]  # added as special tokens, in this order (ids 0..n-1)
    roles: dict[str, str | None]  # bos/eos/pad/unk token strings
    box_format: str
    end_of_turn: str  # what closes an assistant turn (generation stops on it)
    add_bos: bool = False  # the tokenizer itself prepends bos (Llama-2 style)
    extra_tokens: dict[str, str] = field(default_factory=dict)  # tokenizer.<name> attributes
    template_words: tuple[str, ...] = ()  # template text the BPE should learn


FAMILIES: dict[str, Family] = {
    "llava15": Family(
        special=("<unk>", "<s>", "</s>", "<pad>", "<image>"),
        roles=dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"),
        box_format="int100",
        end_of_turn="</s>",
        add_bos=True,
        extra_tokens={"image_token": "<image>"},
        template_words=(LLAVA_SYSTEM, "USER: ", " ASSISTANT:", "[INST] ", " [/INST]"),
    ),
    "qwen2_vl": Family(
        special=tuple(_QWEN_SPECIAL),
        roles=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        box_format="qwen2vl",
        end_of_turn="<|im_end|>",
        extra_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
        template_words=("system\nYou are a helpful assistant.", "user\n", "assistant\n", "Picture 1: "),
    ),
    "idefics3": Family(
        special=(
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<pad>",
            "<fake_token_around_image>",
            "<image>",
            "<end_of_utterance>",
            "<global-img>",
            *_ROW_COL,
        ),
        roles=dict(bos_token="<|begin_of_text|>", eos_token="<end_of_utterance>", pad_token="<pad>"),
        box_format="int100",
        end_of_turn="<end_of_utterance>",
        extra_tokens={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
        template_words=("User: ", "User:", "Assistant: ", "Assistant:", "System: "),
    ),
    "smolvlm": Family(
        special=(
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<fake_token_around_image>",
            "<image>",
            "<end_of_utterance>",
            "<global-img>",
            *_ROW_COL,
        ),
        roles=dict(
            bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|im_end|>", unk_token="<|endoftext|>"
        ),
        box_format="int100",
        end_of_turn="<end_of_utterance>",
        extra_tokens={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
        template_words=("User: ", "User:", "Assistant: ", "Assistant:", "System: "),
    ),
}
FAMILIES["qwen25_vl"] = FAMILIES["qwen2_vl"]


@dataclass
class TinyHFSpec:
    """Sizes of a tiny model; the defaults make a training step take well under a second on CPU."""

    image_size: int = 56  # side of the image the vision tower sees (Qwen: a multiple of 28)
    patch_size: int = 14  # ViT patch (Qwen: 14 as in the real models)
    tile_size: int | None = None  # Idefics3/SmolVLM: side of one tile (= vision image_size); images
    # are first resized to longest edge ``image_size`` and cut into tiles plus a global view
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    max_positions: int = 2048
    vocab_size: int = 512  # BPE merges trained locally (special tokens come on top)
    chat_template: str | None = None  # a CHAT_TEMPLATES key or a template; default: the arch's own


# --- tokenizer --------------------------------------------------------------------------------


def train_family_tokenizer(
    arch: str,
    texts: Iterable[str],
    vocab_size: int,
    cache_dir: str | Path | None = None,
    chat_template: str | None = None,
):
    """A byte-level BPE trained on ``texts`` with the family's special tokens (cached on disk)."""
    from filelock import FileLock
    from transformers import PreTrainedTokenizerFast

    fam = FAMILIES[arch]
    texts = list(texts) + list(fam.template_words) * 20
    key = hashlib.sha1(("\n".join(sorted(set(texts))) + f"|{arch}|{vocab_size}|v1").encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"tok-{arch}-{key}" if cache_dir else None

    def finish(tok):
        tok.chat_template = resolve_chat_template(chat_template or arch)
        return tok

    if path is None:
        return finish(_build_tokenizer(fam, texts, vocab_size))
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if (path / "tokenizer.json").exists():
            return finish(PreTrainedTokenizerFast.from_pretrained(str(path)))
        tok = _build_tokenizer(fam, texts, vocab_size)
        tok.save_pretrained(str(path))
        log.info("trained %s tokenizer (%d tokens) cached at %s", arch, len(tok), path)
        return finish(tok)


def _build_tokenizer(fam: Family, texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=fam.roles.get("unk_token")))
    # Digits one per token, as in Llama/Qwen tokenizers: coordinates are spelled digit by digit.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(fam.special),
        special_tokens=list(fam.special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    if fam.add_bos:
        bos = fam.roles["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    roles = {k: v for k, v in fam.roles.items() if v is not None}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens=dict(fam.extra_tokens), **roles)
    # Every family special token is "special" (skipped when decoding with skip_special_tokens).
    fast.add_special_tokens(
        {"additional_special_tokens": [t for t in fam.special if t not in roles.values()]},
        replace_extra_special_tokens=False,
    )
    return fast


# --- models and processors --------------------------------------------------------------------


def _llama(tok, s: TinyHFSpec):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=s.max_positions,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def _build_llava15(tok, s: TinyHFSpec):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    n_patches = (s.image_size // s.patch_size) ** 2
    vision = CLIPVisionConfig(
        hidden_size=s.vision_hidden,
        intermediate_size=2 * s.vision_hidden,
        num_hidden_layers=s.vision_layers,
        num_attention_heads=s.vision_heads,
        image_size=s.image_size,
        patch_size=s.patch_size,
        projection_dim=s.vision_hidden,
    )
    # As llava-1.5: penultimate CLIP layer, CLS token dropped ("default"), 2-layer GELU projector.
    config = LlavaConfig(
        vision_config=vision,
        text_config=_llama(tok, s),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=n_patches,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": s.image_size},
        crop_size={"height": s.image_size, "width": s.image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=s.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    return model, processor, {}


def _qwen_text(tok, s: TinyHFSpec, cls):
    head_dim = s.hidden // s.heads
    q = head_dim // 2  # mrope sections (temporal, height, width) sum to head_dim / 2
    section = [q - 2 * (3 * q // 8), 3 * q // 8, 3 * q // 8]
    return cls(
        vocab_size=len(tok),
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=s.max_positions,
        rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1000000.0},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _qwen_ids(tok) -> dict:
    c = tok.convert_tokens_to_ids
    return dict(
        image_token_id=c("<|image_pad|>"),
        video_token_id=c("<|video_pad|>"),
        vision_start_token_id=c("<|vision_start|>"),
        vision_end_token_id=c("<|vision_end|>"),
    )


def _qwen_processor(tok, s: TinyHFSpec, processor_cls):
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    if s.image_size % (2 * s.patch_size):
        raise ValueError(f"Qwen image_size {s.image_size} must be a multiple of 2 x patch_size = {2 * s.patch_size}")
    px = s.image_size * s.image_size
    image_processor = Qwen2VLImageProcessor(
        min_pixels=px, max_pixels=px, patch_size=s.patch_size, merge_size=2, temporal_patch_size=2
    )
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=px, max_pixels=px, patch_size=s.patch_size, merge_size=2, temporal_patch_size=2
    )
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        chat_template=tok.chat_template,
    )


def _build_qwen2_vl(tok, s: TinyHFSpec):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

    vision = Qwen2VLVisionConfig(
        depth=s.vision_layers,
        embed_dim=s.vision_hidden,
        hidden_size=s.hidden,
        mlp_ratio=2,
        num_heads=s.vision_heads,
        patch_size=s.patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    config = Qwen2VLConfig(text_config=_qwen_text(tok, s, Qwen2VLTextConfig), vision_config=vision, **_qwen_ids(tok))
    return Qwen2VLForConditionalGeneration(config), _qwen_processor(tok, s, Qwen2VLProcessor), {}


def _build_qwen25_vl(tok, s: TinyHFSpec):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig

    # Window attention as in the real model: window = 2 merged patches, last block full attention.
    vision = Qwen2_5_VLVisionConfig(
        depth=s.vision_layers,
        hidden_size=s.vision_hidden,
        intermediate_size=2 * s.vision_hidden,
        num_heads=s.vision_heads,
        patch_size=s.patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=4 * s.patch_size,
        out_hidden_size=s.hidden,
        fullatt_block_indexes=[s.vision_layers - 1],
    )
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text(tok, s, Qwen2_5_VLTextConfig), vision_config=vision, **_qwen_ids(tok)
    )
    return Qwen2_5_VLForConditionalGeneration(config), _qwen_processor(tok, s, Qwen2_5_VLProcessor), {}


def _idefics_parts(tok, s: TinyHFSpec, vision_cls, config_cls, scale_factor: int = 2):
    tile = s.tile_size or s.image_size
    if (tile // s.patch_size) % scale_factor:
        raise ValueError(f"tile_size / patch_size = {tile // s.patch_size} must be divisible by {scale_factor}")
    vision = vision_cls(
        hidden_size=s.vision_hidden,
        intermediate_size=2 * s.vision_hidden,
        num_hidden_layers=s.vision_layers,
        num_attention_heads=s.vision_heads,
        image_size=tile,
        patch_size=s.patch_size,
    )
    config = config_cls(
        vision_config=vision,
        text_config=_llama(tok, s),
        scale_factor=scale_factor,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
    )
    image_seq_len = (tile // s.patch_size) ** 2 // scale_factor**2
    image_kw = dict(
        do_image_splitting=True,
        size={"longest_edge": s.image_size},
        max_image_size={"longest_edge": tile},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    return config, image_seq_len, image_kw


def _build_idefics3(tok, s: TinyHFSpec):
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    config, seq_len, image_kw = _idefics_parts(tok, s, Idefics3VisionConfig, Idefics3Config)
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(**image_kw),
        tokenizer=tok,
        image_seq_len=seq_len,
        chat_template=tok.chat_template,
    )
    return Idefics3ForConditionalGeneration(config), processor, {"nest_images": True}


def _build_smolvlm(tok, s: TinyHFSpec):
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    config, seq_len, image_kw = _idefics_parts(tok, s, SmolVLMVisionConfig, SmolVLMConfig)
    video_processor = SmolVLMVideoProcessor(
        size={"longest_edge": s.image_size}, max_image_size={"longest_edge": s.tile_size or s.image_size}
    )
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(**image_kw),
        tokenizer=tok,
        video_processor=video_processor,
        image_seq_len=seq_len,
        chat_template=tok.chat_template,
    )
    return SmolVLMForConditionalGeneration(config), processor, {"nest_images": True}


_BUILDERS = {
    "llava15": _build_llava15,
    "qwen2_vl": _build_qwen2_vl,
    "qwen25_vl": _build_qwen25_vl,
    "idefics3": _build_idefics3,
    "smolvlm": _build_smolvlm,
}


def build_tiny_hf(
    arch: str,
    corpus: list[str],
    spec: TinyHFSpec | dict | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
):
    """(model, processor, box format name, Backbone.extra) of a tiny ``arch`` model, built offline."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown model.arch {arch!r}; tiny_hf builds {ARCHS}")
    spec = spec if isinstance(spec, TinyHFSpec) else TinyHFSpec(**dict(spec or {}))
    tok = train_family_tokenizer(arch, corpus, spec.vocab_size, cache_dir, spec.chat_template)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, processor, extra = _BUILDERS[arch](tok, spec)
    fam = FAMILIES[arch]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    extra = {**extra, "arch": arch, "end_of_turn": fam.end_of_turn}
    return model, processor, fam.box_format, extra
