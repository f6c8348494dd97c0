"""The backbone factory: one entry point for the tiny model built in code and HF checkpoints.

``model._target_`` names the builder, ``builder(cfg, corpus, cache_dir) -> Backbone``:
:func:`tiny_llava` builds a LLaVA from a config with a tokenizer trained on the data's text
(cached); :func:`tiny_hf` (``model.arch=...``) a tiny random model of a real HF VLM architecture
with its real processor class (:mod:`unveil.models.tiny_hf`); :func:`hf` loads
``model.name_or_path`` (hub id or local dir). A new backbone family is one builder plus one yaml.
``model.init_from`` starts from an earlier run (its ``backbone/`` dir), a saved HF dir, or a
Lightning ``.ckpt``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unveil.data.boxes import BoxFormat, get_box_format
from unveil.models import chat

log = logging.getLogger(__name__)


@dataclass
class Backbone:
    model: torch.nn.Module
    processor: Any
    box_format: BoxFormat
    name: str
    structured_chat: bool = False  # HF templates want content lists; the tiny one plain strings
    extra: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # derived lookups (e.g. grid token ids)
    build_metrics: dict = field(default_factory=dict)  # what building it measured (the vision warm-up's stats)

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def image_token_ids(self) -> list[int]:
        """Ids generation must never emit (image placeholders and their wrappers)."""
        tok = self.tokenizer
        ids = set()
        for t in (
            "<image>",
            "<|image_pad|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<fake_token_around_image>",
            "<global-img>",
            "<|video_pad|>",
            "<|vision_pad|>",
            *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
        ):
            i = tok.convert_tokens_to_ids(t)
            if isinstance(i, int) and i != tok.unk_token_id and i is not None:
                ids.add(i)
        cfg_id = getattr(self.base_model.config, "image_token_id", None) or getattr(
            self.base_model.config, "image_token_index", None
        )
        if cfg_id is not None:
            ids.add(int(cfg_id))
        return sorted(ids)

    @property
    def base_model(self) -> torch.nn.Module:
        """The underlying HF model, under any PEFT wrapper."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def render(self, messages, add_generation_prompt: bool = False, add_virtual_user_prompt: bool = False) -> str:
        return chat.render(self, messages, add_generation_prompt, add_virtual_user_prompt)

    def save(self, path: str | Path) -> None:
        """save_pretrained model (LoRA merged) + processor: loadable as ``model=hf`` later."""
        path = Path(path)
        model = self.model
        if hasattr(model, "merge_and_unload"):
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(path)
        self.processor.save_pretrained(path)
        (path / "unveil_backbone.txt").write_text(
            f"box_format={self.box_format.name}\nstructured_chat={self.structured_chat}\n"
            f"image_aspect={self.extra.get('image_aspect', 'native')}\n"
        )


def _hf_load(path: str, cfg, dtype):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import unveil.models.conv_vision  # noqa: F401  (registers the tiny model's tower with the Auto classes)

    trust = bool(cfg.get("trust_remote_code", False))
    kw = dict(trust_remote_code=trust, local_files_only=bool(cfg.get("local_files_only", False)))
    processor = AutoProcessor.from_pretrained(path, **kw, **(cfg.get("processor_kwargs") or {}))
    if cfg.get("chat_template"):  # a checkpoint whose own template does not fit training (llava-hf) or is missing
        from unveil.models.chat_templates import resolve_chat_template

        processor.chat_template = resolve_chat_template(cfg.chat_template)
    if cfg.get("eos_token"):  # the token that ends an assistant turn, where the tokenizer names another
        processor.tokenizer.eos_token = cfg.eos_token
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, attn_implementation=cfg.get("attn_implementation") or None, **kw
    )
    return model, processor


def _dtype(name: str | None):
    return {
        None: None,
        "auto": "auto",
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[name]


def saved_dir(init_from) -> Path | None:
    """The saved model dir ``init_from`` names (itself, or a run dir's ``backbone/``), else None."""
    p = Path(str(init_from))
    if (p / "backbone" / "config.json").exists():
        p = p / "backbone"
    return p if (p / "config.json").exists() else None


def _saved_meta(p: Path) -> dict:
    """What a run saved beside its model (unveil_backbone.txt: box format, chat style, image aspect)."""
    f = p / "unveil_backbone.txt"
    return dict(l.split("=", 1) for l in f.read_text().split()) if f.exists() else {}


def _load_saved(p: Path, cfg) -> Backbone:
    """A model saved by a run: weights and processor, box format and chat style from unveil_backbone.txt."""
    model, processor = _hf_load(str(p), cfg, _dtype(cfg.get("dtype")))
    meta = _saved_meta(p)
    bb = Backbone(
        model,
        processor,
        get_box_format(meta.get("box_format", cfg.box_format)),
        name=str(p),
        structured_chat=meta.get(
            "structured_chat",
            str(cfg.get("structured_chat", builder_of(cfg) is not tiny_llava)),
        )
        == "True",
    )
    if meta.get("image_aspect"):  # as it was trained, unless model.image_aspect says otherwise
        bb.extra["image_aspect"] = meta["image_aspect"]
    log.info("backbone initialised from %s", p)
    return bb


def tiny_llava(cfg, corpus: list[str] | None, cache_dir: str | Path | None) -> Backbone:
    from unveil.models.tiny_llava import TinyLlavaSpec, build_model, build_processor
    from unveil.models.tokenizer import train_tokenizer

    if not corpus:
        raise ValueError("model=tiny_llava trains its tokenizer on the data's text: pass the training corpus")
    spec = TinyLlavaSpec(**dict(cfg.spec))
    # the chat template's own words, so they are single tokens rather than letter runs
    corpus = list(corpus) + ["USER: ASSISTANT: </s>"] * 50
    tok = train_tokenizer(corpus, spec.vocab_size, Path(cache_dir) / "tokenizers" if cache_dir else None)
    return Backbone(
        build_model(tok, spec, seed=int(cfg.get("init_seed", 0))),
        build_processor(tok, spec),
        get_box_format(cfg.box_format),
        name="tiny_llava",
        structured_chat=False,
    )


def tiny_hf(cfg, corpus: list[str] | None, cache_dir: str | Path | None) -> Backbone:
    from unveil.models.tiny_hf import build_tiny_hf

    if not corpus:
        raise ValueError("model=tiny_hf trains its tokenizer on the data's text: pass the training corpus")
    model, processor, box_format, extra = build_tiny_hf(
        cfg.arch,
        corpus,
        dict(cfg.get("spec") or {}),
        seed=int(cfg.get("init_seed", 0)),
        cache_dir=Path(cache_dir) / "tokenizers" if cache_dir else None,
    )
    return Backbone(
        model,
        processor,
        get_box_format(cfg.get("box_format") or box_format),
        name=f"tiny_{cfg.arch}",
        structured_chat=True,
        extra=extra,
    )


def hf(cfg, corpus: list[str] | None = None, cache_dir: str | Path | None = None) -> Backbone:
    if not cfg.get("name_or_path"):
        raise ValueError("model=hf needs model.name_or_path=<hub id or local dir>")
    model, processor = _hf_load(str(cfg.name_or_path), cfg, _dtype(cfg.get("dtype")))
    saved = _saved_meta(Path(str(cfg.name_or_path)))  # a run's backbone/ dir: the image aspect it trained with
    return Backbone(
        model,
        processor,
        get_box_format(cfg.box_format),
        name=str(cfg.name_or_path),
        structured_chat=bool(cfg.get("structured_chat", True)),
        extra={"image_aspect": saved["image_aspect"]} if saved.get("image_aspect") else {},
    )


def build_backbone(
    cfg,
    peft=None,
    corpus: list[str] | None = None,
    cache_dir: str | Path | None = None,
    records=None,
    resuming: bool = False,
    seed: int = 0,
) -> Backbone:
    """Build the backbone described by the ``model`` and ``peft`` config groups.

    ``records`` (a loaded :class:`~unveil.data.records.RecordSet`) gives the corpus the tiny models'
    tokenizers are trained on and, for the tower built in code, the boxes its vision warm-up
    learns from (``model.vision_pretrain``; not when ``resuming``: the checkpoint holds the tower).
    Its stats are in ``Backbone.build_metrics``."""
    if records is not None and corpus is None:
        corpus = records.corpus()
    init_from = cfg.get("init_from")
    if init_from:
        saved = saved_dir(init_from)
        if saved is not None:
            return _finish(_load_saved(saved, cfg), cfg, peft)
        if Path(str(init_from)).suffix != ".ckpt":
            raise FileNotFoundError(f"model.init_from={init_from}: not a run dir, a saved model dir or a .ckpt file")
    # a .ckpt holds Lightning weights only: build the configured model, then load them into it
    bb = check_model(cfg)(cfg, corpus, cache_dir)
    if init_from and str(init_from).endswith(".ckpt"):
        load_lightning_weights(bb.model, init_from)
    elif records is not None and built_in_code(cfg):
        from unveil.models.vision_pretrain import warm_up

        if not resuming:
            bb.build_metrics.update(warm_up(bb, cfg, records, seed=seed))
        elif (cfg.get("vision_pretrain") or {}).get("steps", 0) > 0:
            # the checkpoint restores the policy, but a reference model (KL anchor) is taken from the model as built
            log.warning(
                "resuming without model.init_from: the first run warmed the vision tower up before an RL/DPO "
                "stage took its reference model, the resumed run does not, so its reference differs. Start "
                "RL/DPO from model.init_from=<SFT run>, which a resume reloads."
            )
    return _finish(bb, cfg, peft)


def check_model(cfg):
    """The builder ``model._target_`` names, or a ValueError listing the model configs there are
    (train() checks it before any work)."""
    from unveil.utils.plug import locate

    return locate(cfg.get("_target_"), "model", group="model")


def builder_of(cfg):
    """The builder ``model._target_`` names (:func:`tiny_llava`, :func:`tiny_hf`, :func:`hf`, or a
    project's own), or None where it names nothing: the one place that tells model kinds apart."""
    from unveil.utils.plug import locate

    try:
        return locate((cfg or {}).get("_target_"), "model")
    except ValueError:
        return None


def built_in_code(cfg) -> bool:
    """Whether the model is the tiny LLaVA built in code (no pretrained tower, a trained tokenizer)."""
    return builder_of(cfg) is tiny_llava and not cfg.get("init_from")


def loads_a_checkpoint(cfg) -> bool:
    """Whether the model loads a saved or hub checkpoint (``model=hf`` and its presets)."""
    return builder_of(cfg) is hf


_NESTED_IMAGES = ("Idefics2Processor", "Idefics3Processor", "SmolVLMProcessor")


def _finish(bb: Backbone, cfg, peft_cfg=None) -> Backbone:
    from omegaconf import OmegaConf

    from unveil.models.freeze import apply_freeze, apply_lora

    if type(bb.processor).__name__ in _NESTED_IMAGES:  # they group images per prompt only when nested
        bb.extra.setdefault("nest_images", True)
    extra = cfg.get("extra") or {}
    bb.extra.update(extra if isinstance(extra, dict) else OmegaConf.to_container(extra, resolve=True))
    _set_image_aspect(bb, cfg)
    lora = None
    if peft_cfg and peft_cfg.get("_target_"):  # conf/peft/lora.yaml: peft.LoraConfig
        from unveil.utils.plug import as_dict, instantiate

        spec = as_dict(peft_cfg)
        if cfg.get("peft_target_modules"):  # architectures whose LM is not `language_model`
            spec["target_modules"] = cfg.peft_target_modules
        lora = instantiate(spec, "peft", group="peft")
    fz = cfg.get("freeze") or {}
    apply_freeze(
        bb.model, bool(fz.get("vision", False)), bool(fz.get("projector", False)), bool(fz.get("language", False))
    )
    if lora is not None:
        bb.model = apply_lora(bb.model, lora)
    if cfg.get("gradient_checkpointing", False):
        bb.base_model.gradient_checkpointing_enable()
    return bb


def _set_image_aspect(bb: Backbone, cfg) -> None:
    """``model.image_aspect`` into ``Backbone.extra`` (unveil.data.frames reads it there).

    ``pad`` (LLaVA's ``image_aspect_ratio: pad``) squares each image before the processor; the
    tiny LLaVA's vision warm-up feeds its processor directly, so it keeps ``native`` (its processor
    resizes the whole image, which normalised boxes survive)."""
    from unveil.data.frames import ASPECTS

    aspect = str(cfg.get("image_aspect") or bb.extra.get("image_aspect") or "native")
    if aspect not in ASPECTS:
        raise ValueError(f"model.image_aspect={aspect!r}; expected one of {', '.join(ASPECTS)}")
    if aspect == "pad" and builder_of(cfg) is tiny_llava:
        raise ValueError("model.image_aspect=pad is not supported by model=tiny_llava (its warm-up reads raw images)")
    bb.extra["image_aspect"] = aspect


def load_lightning_weights(model: torch.nn.Module, ckpt_path: str | Path) -> None:
    """Load a Lightning checkpoint's ``model.*`` weights (weights_only: no pickled code runs)."""
    state = torch.load(str(ckpt_path), map_location="cpu", weights_only=True)["state_dict"]
    prefix = "model."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [m for m in missing if "lora" not in m]:
        raise RuntimeError(
            f"{ckpt_path}: weights do not fit this backbone (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
