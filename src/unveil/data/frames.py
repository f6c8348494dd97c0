"""Where each image lands in the model's input: the frame of a backbone's boxes.

Canonical boxes are normalised to the *original* image (docs/data_formats.md#boxes); the text a
backbone reads and writes describes the image *as the model sees it*. A :class:`Frame` is that
map for one image, decided by the backbone's image handling (``model.image_aspect``) and its
processor's resize rule:

- ``pad`` (LLaVA's ``image_aspect_ratio: pad``, the LLaVA-1.5 / LLaVA-Med / Mantis default):
  ``expand2square`` pastes the ``w x h`` image into an ``S x S`` square, ``S = max(w, h)``, at
  ``(ox, oy) = ((S - w) // 2, (S - h) // 2)``, filled with the processor's mean colour; the
  processor then resizes the square (its centre crop is the whole square). Per axis::

      x_model = (x * w + ox) / S            x = (x_model * S - ox) / w

- ``native``: the processor's own handling. Whole-image resizes (the tiny LLaVA, Qwen's
  ``smart_resize``, Idefics3's tiles) keep normalised boxes as they are; a centre-cropping
  processor (llava-hf's CLIP ``shortest_edge`` + ``crop_size``) would cut the sides of a
  non-square image, which is why LLaVA-style configs pad.
- ``size``: ``(width, height)`` in pixels of the image the model sees, for box formats in
  absolute pixels (Qwen2.5-VL, ``qwen25_abs``): Qwen2-VL's ``smart_resize`` of *this* image
  (both sides multiples of ``patch_size * merge_size``, pixel count within the processor's
  ``min_pixels`` / ``max_pixels``), so a portrait chest X-ray gets its own grid.

Answer text is rewritten into a backbone's format through the frame (:func:`model_messages`)
and model text is parsed back through it (:meth:`Frame.parse_spans`), so metrics, rewards and
records only ever see original-image boxes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from unveil.data.boxes import IntGridFormat, ParsedBox

ASPECTS = ("native", "pad")
_CANON = IntGridFormat(100)  # box text in record files is on the 0-100 grid


@dataclass(frozen=True)
class Frame:
    """``model = original * scale + offset`` per axis (normalised); ``size`` = (W, H) the model sees."""

    sx: float = 1.0
    sy: float = 1.0
    ox: float = 0.0
    oy: float = 0.0
    size: tuple[int, int] | None = None

    @property
    def identity(self) -> bool:
        return (self.sx, self.sy, self.ox, self.oy) == (1.0, 1.0, 0.0, 0.0)

    def to_model(self, box) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = (float(v) for v in box)
        return (x1 * self.sx + self.ox, y1 * self.sy + self.oy, x2 * self.sx + self.ox, y2 * self.sy + self.oy)

    def to_original(self, box) -> tuple[float, float, float, float] | None:
        """The original-image box of a model-frame box, clipped to the image; None when nothing of it
        lies on the image (a box drawn on the padding)."""
        x1, y1, x2, y2 = (float(v) for v in box)
        x1, x2 = ((v - self.ox) / self.sx for v in (x1, x2))
        y1, y2 = ((v - self.oy) / self.sy for v in (y1, y2))
        x1, x2, y1, y2 = (min(max(v, 0.0), 1.0) for v in (x1, x2, y1, y2))
        return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None

    def format_box(self, box_format, box) -> str:
        return box_format.format_box(self.to_model(box), self.size)

    def parse_spans(self, box_format, text) -> list[ParsedBox]:
        """Boxes of model text in the original image (spans of the text kept, for labels)."""
        out = []
        for p in box_format.parse_spans(text, self.size):
            b = self.to_original(p.box)
            if b is not None:
                out.append(ParsedBox(b, p.start, p.end))
        return out


IDENTITY = Frame()


# --- the backbone's image handling ----------------------------------------------------------------


def image_aspect(backbone) -> str:
    aspect = str((getattr(backbone, "extra", None) or {}).get("image_aspect", "native"))
    if aspect not in ASPECTS:
        raise ValueError(f"model.image_aspect={aspect!r}; expected one of {ASPECTS}")
    return aspect


def _image_processor(backbone):
    proc = getattr(backbone, "processor", None)
    return getattr(proc, "image_processor", None)


def pad_fill(backbone) -> tuple[int, int, int]:
    """The padding colour: the processor's mean, as LLaVA's ``tuple(int(x * 255) for x in image_mean)``."""
    mean = getattr(_image_processor(backbone), "image_mean", None) or [0.5, 0.5, 0.5]
    mean = list(mean) * 3 if len(mean) == 1 else list(mean)
    return tuple(int(x * 255) for x in mean[:3])


def expand2square(img: Image.Image, fill) -> Image.Image:
    """LLaVA's ``expand2square``: the image centred on a square of side max(w, h), filled with ``fill``."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill if img.mode == "RGB" else fill[0])
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def prepare_image(backbone, img: Image.Image) -> Image.Image:
    """The image the processor is given: padded to a square under ``image_aspect: pad``."""
    return expand2square(img, pad_fill(backbone)) if image_aspect(backbone) == "pad" else img


def resized_size(backbone, w: int, h: int) -> tuple[int, int]:
    """(W, H) of a ``w x h`` image after the processor's resize, for absolute-pixel box formats.

    Qwen2-VL / Qwen2.5-VL image processors: ``smart_resize`` with their own factor and pixel
    bounds. Other processors have no rule here, which is an error rather than a guess."""
    ip = _image_processor(backbone)
    merge, patch = getattr(ip, "merge_size", None), getattr(ip, "patch_size", None)
    size = getattr(ip, "size", None) or {}
    lo = size.get("shortest_edge", getattr(ip, "min_pixels", None))
    hi = size.get("longest_edge", getattr(ip, "max_pixels", None))
    if None in (merge, patch, lo, hi):
        raise ValueError(
            f"box format {backbone.box_format.name!r} writes boxes in pixels of the resized image, but "
            f"{type(ip).__name__} has no known resize rule (Qwen2-VL's smart_resize: patch_size, merge_size, "
            "min/max pixels)"
        )
    if not getattr(ip, "do_resize", True):
        return w, h
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    rh, rw = smart_resize(h, w, factor=int(patch) * int(merge), min_pixels=int(lo), max_pixels=int(hi))
    return int(rw), int(rh)


def frame_for(backbone, w: int, h: int) -> Frame:
    """The frame of one ``w x h`` (original pixels) image for this backbone."""
    sx = sy = 1.0
    ox = oy = 0.0
    if image_aspect(backbone) == "pad" and w != h:
        side = max(w, h)
        sx, sy, ox, oy = w / side, h / side, ((side - w) // 2) / side, ((side - h) // 2) / side
        w = h = side
    size = resized_size(backbone, w, h) if backbone.box_format.needs_image_size else None
    return Frame(sx, sy, ox, oy, size)


def needs_frames(backbone) -> bool:
    """False when every frame is the identity without a size (no image needs reading)."""
    fmt = getattr(backbone, "box_format", None)
    return image_aspect(backbone) == "pad" or bool(getattr(fmt, "needs_image_size", False))


@functools.lru_cache(maxsize=1 << 16)
def _size(path: str, mtime_ns: int) -> tuple[int, int]:
    from unveil.data.images import LOADERS, _suffix, load_image

    if _suffix(Path(path)) in LOADERS:  # DICOM / NIfTI: the frame or slice the loader returns
        return load_image(path).size
    with Image.open(path) as im:  # the header only
        return im.size


def original_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file as loaded (cached per file version)."""
    p = Path(path)
    return _size(str(p), p.stat().st_mtime_ns)


def sample_frames(backbone, images, sizes=None) -> list[Frame]:
    """One frame per image path of a sample (``sizes``: their (w, h), when already loaded)."""
    if not needs_frames(backbone):
        return [IDENTITY] * len(images)
    sizes = sizes if sizes is not None else [original_size(p) for p in images]
    return [frame_for(backbone, int(w), int(h)) for w, h in sizes]


def box_frame(frames: list[Frame], box_images, k: int) -> Frame:
    """The frame of the k-th box of a text: the image ``box_images[k]`` names (one frame when all agree)."""
    if not frames:
        return IDENTITY
    if all(f == frames[0] for f in frames) or not box_images:
        return frames[0]
    i = box_images[k] if k < len(box_images) else box_images[-1]
    return frames[i] if 0 <= i < len(frames) else frames[0]


# --- text in and out of the model's frame ----------------------------------------------------------


def to_model_text(text: str, box_format, frames: list[Frame], box_images=()) -> str:
    """Canonical ``[x1, y1, x2, y2]`` (0-100, original image) box text -> the backbone's format in its frame."""
    if box_format.name == _CANON.name and all(f.identity for f in frames):
        return text
    spans = _CANON.parse_spans(text)
    out, last = [], 0
    for k, p in enumerate(spans):
        out += [text[last : p.start], box_frame(frames, box_images, k).format_box(box_format, p.box)]
        last = p.end
    return "".join(out) + text[last:]


def model_messages(backbone, s, sizes=None) -> list[dict]:
    """The sample's messages with assistant-turn boxes in the backbone's format and frame."""
    if not needs_frames(backbone) and getattr(backbone.box_format, "name", None) == _CANON.name:
        return s.messages
    frames = sample_frames(backbone, s.images, sizes)
    return [
        {**m, "content": to_model_text(m["content"], backbone.box_format, frames, s.box_images)}
        if m["role"] == "assistant"
        else m
        for m in s.messages
    ]


def answer_frame(backbone, s) -> Frame:
    """The frame model answers about ``s`` are parsed in: its first box's image (else the first image)."""
    if not s.images or not needs_frames(backbone):
        return IDENTITY
    k = s.box_images[0] if s.box_images else 0
    k = k if 0 <= k < len(s.images) else 0
    return sample_frames(backbone, [s.images[k]])[0]
