"""The one sample schema every format adapter produces (docs/data_formats.md#the-sample).

Everything after the adapters sees only :class:`Sample`. Boxes follow the box contract in
:mod:`unveil.data.boxes`: ``[x1, y1, x2, y2]`` normalised to [0, 1] in the original image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant", "virtual_user")

# Task names a researcher can filter on; adapters may add their own.
TASKS = ("localize", "vqa_closed", "vqa_open", "mcq", "report", "compare", "describe")


@dataclass
class Rejected:
    """The dispreferred side of a preference pair. Either part may be absent (= same as chosen)."""

    messages: list[dict[str, str]] | None = None
    images: list[str] | None = None


@dataclass
class Sample:
    id: str
    images: list[str] = field(default_factory=list)  # absolute paths, one per <image> placeholder
    messages: list[dict[str, str]] = field(default_factory=list)  # {"role", "content"}
    boxes: list[list[float]] = field(default_factory=list)  # normalised xyxy
    box_images: list[int] = field(default_factory=list)  # which image each box lies in
    findings: list[str] = field(default_factory=list)  # one label per box
    task: str = "vqa_open"
    answer: str | None = None  # short reference (closed/mcq answer), when there is one
    rejected: Rejected | None = None
    weight: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)  # source, modality, ability, patient_id, ...

    def __post_init__(self) -> None:
        if self.boxes and not self.box_images:
            self.box_images = [0] * len(self.boxes)

    # --- views the stages use -------------------------------------------------------------
    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """Messages up to (not including) the final assistant turn: what a model is asked."""
        last = max((i for i, m in enumerate(self.messages) if m["role"] == "assistant"), default=len(self.messages))
        return self.messages[:last]

    @property
    def target(self) -> str:
        """Text of the final assistant turn (the reference answer)."""
        for m in reversed(self.messages):
            if m["role"] == "assistant":
                return m["content"]
        return ""

    @property
    def is_abnormal(self) -> bool:
        return len(self.boxes) > 0

    @property
    def modality(self) -> str:
        return str(self.meta.get("modality", "unknown"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Sample:
        d = dict(d)
        if d.get("rejected") is not None and not isinstance(d["rejected"], Rejected):
            d["rejected"] = Rejected(**d["rejected"])
        return Sample(**d)


def validate_sample(s: Sample) -> list[tuple[str, str]]:
    """Return a list of (field, problem) for a sample; empty when it is valid."""
    problems: list[tuple[str, str]] = []
    n_ph = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in s.messages if m["role"] != "assistant")
    if n_ph != len(s.images):
        problems.append(("images", f"{len(s.images)} image(s) but {n_ph} '{IMAGE_PLACEHOLDER}' placeholder(s)"))
    sides = [("messages", s.messages)]
    if s.rejected is not None and s.rejected.messages is not None:
        sides.append(("rejected", s.rejected.messages))
    for where, messages in sides:
        for m in messages:
            if m.get("role") not in ROLES:
                problems.append((where, f"unknown role {m.get('role')!r}"))
            if not isinstance(m.get("content"), str):
                problems.append((where, "content must be a string"))
            elif m.get("role") == "assistant" and IMAGE_PLACEHOLDER in m["content"]:
                # the processor would expand it into image tokens with no image: the batch fails
                problems.append((where, f"'{IMAGE_PLACEHOLDER}' in an assistant turn (placeholders go in the prompt)"))
    if len(s.findings) not in (0, len(s.boxes)):
        problems.append(("findings", f"{len(s.findings)} findings for {len(s.boxes)} boxes"))
    for i, b in enumerate(s.boxes):
        if len(b) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in b):
            problems.append(("boxes", f"box {i} is not four finite numbers: {b!r}"))
            continue
        x1, y1, x2, y2 = b
        if not (0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0):
            problems.append(("boxes", f"box {i} {b!r} is outside the image or empty (normalised xyxy)"))
    for i, k in enumerate(s.box_images):
        if not 0 <= k < max(1, len(s.images)):
            problems.append(("box_images", f"box {i} points at image {k}, sample has {len(s.images)}"))
    if not math.isfinite(s.weight):
        problems.append(("weight", f"not finite: {s.weight!r}"))
    return problems
