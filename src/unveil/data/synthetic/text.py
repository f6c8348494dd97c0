"""Queries and detect -> localise -> diagnose answers for synthetic studies.

Boxes are written on the 0-100 grid (``int100``), the canonical answer-text format of the
record files; the collator rewrites them into each backbone's own BoxFormat.
"""

from __future__ import annotations

import numpy as np

from unveil.data.boxes import IntGridFormat

_BOX = IntGridFormat(100)

LOCALIZE_QUERIES = [
    "Is there an abnormality in this {mod} image? Locate and diagnose it.",
    "Find any abnormal region in this {mod} image, give its box and name it.",
    "Detect, localise and diagnose any abnormality in this {mod} image.",
    "Examine this {mod} image. Where is the abnormality, and what is it?",
]
PRESENCE_QUERIES = [
    "Is there an abnormality in this {mod} image? Answer yes or no.",
    "Does this {mod} image show any abnormal finding? Answer yes or no.",
]
TYPE_QUERIES = ["What type of abnormality is shown? Choose from {choices}."]
MODALITY_QUERIES = ["Which imaging modality is this? Choose from {choices}."]

NORMAL_ANSWER = "No abnormality detected. The study appears normal."


def localize_answer(boxes: list[list[float]], findings: list[str]) -> str:
    """Detect (is there one?) -> localise (box) -> diagnose (type), one clause per lesion."""
    if not boxes:
        return NORMAL_ANSWER
    parts = [f"Region {_BOX.format_box(b)}: {f}." for b, f in zip(boxes, findings)]
    return "Abnormality detected. " + " ".join(parts)


def pick(rng: np.random.Generator, templates: list[str], **kw) -> str:
    return templates[int(rng.integers(len(templates)))].format(**kw)
