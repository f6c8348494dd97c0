"""The box contract (docs/data_formats.md#boxes).

Canonical boxes are ``[x1, y1, x2, y2]`` normalised to [0, 1] in the original image. A
:class:`BoxFormat` turns canonical boxes into the text a given backbone reads and writes, and
parses model text back into canonical boxes. Parsing never raises: whatever string a model
emits, it returns the boxes it could read (possibly none).

Coordinate mix-ups are the most common failure in public grounding-RL code, so every format
round-trips in the tests, and the parse policy is explicit:
- reversed corners are reordered (``[50, 50, 10, 10]`` -> ``[10, 10, 50, 50]``);
- values slightly outside the grid (up to 5%) are clipped, values far outside are dropped;
- boxes of zero area after clipping are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_NUM = r"(-?\d{1,12}(?:\.\d{1,8})?)"
_TOL = 0.05


@dataclass(frozen=True)
class ParsedBox:
    box: tuple[float, float, float, float]  # normalised xyxy
    start: int  # character span of the box in the parsed text
    end: int


def _clean(vals: list[float], sx: float, sy: float) -> tuple[float, float, float, float] | None:
    x1, y1, x2, y2 = vals[0] / sx, vals[1] / sy, vals[2] / sx, vals[3] / sy
    if not all(np.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    if min(x1, y1, x2, y2) < -_TOL or max(x1, y1, x2, y2) > 1 + _TOL:
        return None
    x1, x2 = sorted((min(max(x1, 0.0), 1.0), min(max(x2, 0.0), 1.0)))
    y1, y2 = sorted((min(max(y1, 0.0), 1.0), min(max(y2, 0.0), 1.0)))
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None
    return (x1, y1, x2, y2)


def _find(regex: re.Pattern, text, sx: float, sy: float) -> list[ParsedBox]:
    """Every match of a four-number box pattern that survives the parse policy."""
    out = []
    if not isinstance(text, str):
        return out
    for m in regex.finditer(text):
        try:
            vals = [float(g) for g in m.groups()]
        except (ValueError, OverflowError):
            continue
        b = _clean(vals, sx, sy)
        if b is not None:
            out.append(ParsedBox(b, m.start(), m.end()))
    return out


def _grid(v: float, scale: int) -> int:
    return int(round(min(max(v, 0.0), 1.0) * scale))


def _grid_box(box, scale_x: float, scale_y: float) -> tuple[int, int, int, int]:
    """Quantise a normalised box so that it never collapses to zero width or height."""
    x1, y1, x2, y2 = (_grid(box[0], scale_x), _grid(box[1], scale_y), _grid(box[2], scale_x), _grid(box[3], scale_y))
    if x2 <= x1:
        x2, x1 = (x1 + 1, x1) if x1 < scale_x else (x1, x1 - 1)
    if y2 <= y1:
        y2, y1 = (y1 + 1, y1) if y1 < scale_y else (y1, y1 - 1)
    return x1, y1, x2, y2


class BoxFormat:
    """Formats canonical boxes into answer text and parses them back."""

    name: str = "base"
    needs_image_size: bool = False

    def format_box(self, box, image_size: tuple[int, int] | None = None) -> str:
        raise NotImplementedError

    def format(self, boxes, image_size: tuple[int, int] | None = None, sep: str = "; ") -> str:
        return sep.join(self.format_box(b, image_size) for b in boxes)

    def parse_spans(self, text: str, image_size: tuple[int, int] | None = None) -> list[ParsedBox]:
        raise NotImplementedError

    def parse(self, text: str, image_size: tuple[int, int] | None = None) -> list[tuple[float, float, float, float]]:
        return [p.box for p in self.parse_spans(text, image_size)]


class IntGridFormat(BoxFormat):
    """``[x1, y1, x2, y2]`` as integers on a 0..scale grid (LLaVA-style plain text)."""

    def __init__(self, scale: int = 100):
        self.scale = int(scale)
        self.name = f"int{self.scale}"
        self._re = re.compile(r"\[\s*" + r"\s*,\s*".join([_NUM] * 4) + r"\s*\]")

    def format_box(self, box, image_size=None) -> str:
        x1, y1, x2, y2 = _grid_box(box, self.scale, self.scale)
        return f"[{x1}, {y1}, {x2}, {y2}]"

    def parse_spans(self, text, image_size=None):
        return _find(self._re, text, self.scale, self.scale)

    def off_grid(self, text: str) -> list[str]:
        """The ``[x1, y1, x2, y2]`` texts in ``text`` that are not boxes on this grid
        (``0 <= x1 < x2 <= scale``, same for y). For reference answers: the parse policy would
        silently reorder, clip or drop them."""
        bad = []
        for m in self._re.finditer(text):
            try:
                x1, y1, x2, y2 = (float(g) for g in m.groups())
            except (ValueError, OverflowError):
                bad.append(m.group())
                continue
            if not (0 <= x1 < x2 <= self.scale and 0 <= y1 < y2 <= self.scale):
                bad.append(m.group())
        return bad


class Qwen2VLFormat(BoxFormat):
    """Qwen2-VL: ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` on a 0..1000 grid."""

    name = "qwen2vl"
    scale = 1000
    _re = re.compile(
        r"<\|box_start\|>\s*\(\s*"
        + _NUM
        + r"\s*,\s*"
        + _NUM
        + r"\s*\)\s*,\s*\(\s*"
        + _NUM
        + r"\s*,\s*"
        + _NUM
        + r"\s*\)\s*<\|box_end\|>"
    )

    def format_box(self, box, image_size=None) -> str:
        x1, y1, x2, y2 = _grid_box(box, self.scale, self.scale)
        return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"

    def parse_spans(self, text, image_size=None):
        return _find(self._re, text, self.scale, self.scale)


class AbsolutePixelFormat(IntGridFormat):
    """Qwen2.5-VL: ``[x1, y1, x2, y2]`` in absolute pixels of the (resized) input image.

    ``image_size`` is ``(width, height)`` of the image as the model saw it; without it the
    format cannot be used, so it raises for formatting and returns no boxes when parsing.
    """

    needs_image_size = True

    def __init__(self):
        super().__init__(scale=1)
        self.name = "qwen25_abs"

    def format_box(self, box, image_size=None) -> str:
        if image_size is None:
            raise ValueError("qwen25_abs boxes need the image size (width, height) the model sees")
        w, h = image_size
        x1, y1, x2, y2 = _grid_box(box, w, h)
        return f"[{x1}, {y1}, {x2}, {y2}]"

    def parse_spans(self, text, image_size=None):
        if image_size is None or not isinstance(text, str):
            return []
        return _find(self._re, text, *image_size)


BOX_FORMATS = {
    "int100": lambda: IntGridFormat(100),
    "int1000": lambda: IntGridFormat(1000),
    "qwen2vl": Qwen2VLFormat,
    "qwen25_abs": AbsolutePixelFormat,
}


def get_box_format(name: str) -> BoxFormat:
    try:
        return BOX_FORMATS[name]()
    except KeyError:
        raise ValueError(f"unknown box format {name!r}; known: {sorted(BOX_FORMATS)}") from None


# --- geometry shared by metrics and reward heads --------------------------------------------


def iou_matrix(a, b, generalized: bool = False) -> np.ndarray:
    """Pairwise IoU (or GIoU) between boxes a (N, 4) and b (M, 4), normalised xyxy."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
    if not generalized:
        return iou
    cx1 = np.minimum(a[:, None, 0], b[None, :, 0])
    cy1 = np.minimum(a[:, None, 1], b[None, :, 1])
    cx2 = np.maximum(a[:, None, 2], b[None, :, 2])
    cy2 = np.maximum(a[:, None, 3], b[None, :, 3])
    hull = (cx2 - cx1) * (cy2 - cy1)
    return iou - np.where(hull > 0, (hull - union) / np.maximum(hull, 1e-12), 0.0)


def match_boxes(pred, gt, generalized: bool = False) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Hungarian matching of predicted to ground-truth boxes maximising (G)IoU.

    Returns the matched (pred_index, gt_index) pairs and the full (G)IoU matrix.
    """
    from scipy.optimize import linear_sum_assignment

    m = iou_matrix(pred, gt, generalized=generalized)
    if m.size == 0:
        return [], m
    rows, cols = linear_sum_assignment(-m)
    return list(zip(rows.tolist(), cols.tolist())), m


def pixel_to_normalised(box, width: int, height: int) -> list[float]:
    return [box[0] / width, box[1] / height, box[2] / width, box[3] / height]
