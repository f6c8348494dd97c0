"""MAU-style JSONL: the native record format of unveil (and of the synthetic generator).

One JSON object per line::

    {"id": "p00012_s1-loc",                 # required, string
     "images": ["images/p00012_s1.png"],    # or "image": "..."; relative to the data root
     "query": "Is there an abnormality ...", # user turn; <image> placeholders optional
     "answer": "Abnormality detected. Region [12, 30, 25, 44]: nodule.",
     "boxes": [[0.12, 0.30, 0.25, 0.44]],   # optional; ground-truth regions
     "box_units": "normalized",             # or "pixel" (of the original image)
     "box_image": [0],                      # optional; image index of each box
     "findings": ["nodule"],                # one label per box
     "task": "localize",                    # localize | vqa_closed | vqa_open | mcq | report ...
     "short_answer": "yes",                 # optional, for closed questions
     "modality": "ct", "source": "synthetic", "patient_id": "p00012",   # anything else -> meta
     # preference records (written by `unveil.curate`) add the dispreferred side:
     "rejected": {"answer": "No abnormality detected.", "images": null},  # images: own paths or null
     "weight": 0.8}                         # per-pair weight (default 1.0)

Boxes written inside ``answer`` use the 0-100 integer grid; the collator rewrites them into
the backbone's own box format.
"""

from __future__ import annotations

from pathlib import Path

from unveil.data.adapters.base import Records, collect, iter_json_records, require
from unveil.data.boxes import IntGridFormat
from unveil.data.errors import RecordError
from unveil.data.images import image_size, resolve
from unveil.data.schema import IMAGE_PLACEHOLDER, Rejected, Sample

_KNOWN = {
    "id",
    "image",
    "images",
    "query",
    "answer",
    "boxes",
    "box_units",
    "box_image",
    "findings",
    "task",
    "short_answer",
    "rejected",
    "weight",
    "slice",
}


def _images(rec: dict, n: int, path: Path, root: Path, check_images: bool) -> tuple[list[str], list]:
    """(resolved image paths, their (w, h) sizes or None each) from ``images`` or ``image``."""
    f = str(path)
    if "images" in rec:
        rels = require(rec, "images", list, path, n)
    elif "image" in rec:
        rels = [require(rec, "image", str, path, n)]
    else:
        rels = []
    field = "images" if "images" in rec else "image"
    rels = _with_slices(rec, rels, f, n)
    images = [str(resolve(root, r, f, n, field)) for r in rels]
    sizes = [image_size(p, f, n, field) if check_images else None for p in images]
    return images, sizes


def _with_slices(rec: dict, rels: list, f: str, n: int) -> list:
    """``"slice": 42`` (or one index per image, null for none) picks each NIfTI volume's slice along
    ``data.medical.nifti.axis``: the paths get ``#slice=42``, as if the record had written it."""
    if rec.get("slice") is None:
        return rels
    per = rec["slice"] if isinstance(rec["slice"], list) else [rec["slice"]] * len(rels)
    if len(per) != len(rels) or any(k is not None and (isinstance(k, bool) or not isinstance(k, int)) for k in per):
        raise RecordError(
            f, n, "slice", f"expected an integer or one integer (or null) per image, got {rec['slice']!r:.80}"
        )
    out = []
    for r, k in zip(rels, per):
        if k is not None and isinstance(r, str) and not r.lower().endswith((".nii", ".nii.gz")):
            raise RecordError(f, n, "slice", f"a slice index needs a NIfTI volume (.nii / .nii.gz), got {r!r:.80}")
        out.append(r if k is None or not isinstance(r, str) else f"{r}#slice={k}")
    return out


def _boxes(rec: dict, n: int, f: str, n_images: int, sizes: list) -> tuple[list[list[float]], list]:
    """(normalised boxes, image index of each box); pixel boxes are divided by their image's size."""
    units = rec.get("box_units", "normalized")
    if units not in ("normalized", "pixel"):
        raise RecordError(f, n, "box_units", f"must be 'normalized' or 'pixel', got {units!r}")
    raw_boxes = rec.get("boxes") or []
    if not isinstance(raw_boxes, list):
        raise RecordError(f, n, "boxes", f"expected a list of [x1, y1, x2, y2], got {raw_boxes!r:.80}")
    box_image = rec.get("box_image") or [0] * len(raw_boxes)
    if not isinstance(box_image, list) or len(box_image) != len(raw_boxes):
        raise RecordError(f, n, "box_image", f"expected {len(raw_boxes)} image indices, got {box_image!r:.80}")
    boxes = []
    for i, b in enumerate(raw_boxes):
        if not (
            isinstance(b, list)
            and len(b) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b)
        ):
            raise RecordError(f, n, f"boxes[{i}]", f"expected four numbers [x1, y1, x2, y2], got {b!r:.80}")
        if not isinstance(box_image[i], int) or not 0 <= box_image[i] < max(1, n_images):
            raise RecordError(f, n, f"box_image[{i}]", f"no image {box_image[i]!r} in this record")
        if units == "pixel":
            size = sizes[box_image[i]] if sizes and sizes[box_image[i]] else None
            if size is None:
                raise RecordError(f, n, f"boxes[{i}]", "pixel boxes need a readable image to normalise against")
            w, h = size
            if not (0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h):
                raise RecordError(f, n, f"boxes[{i}]", f"box {b} is outside the {w}x{h} image or empty")
            b = [b[0] / w, b[1] / h, b[2] / w, b[3] / h]
        elif not (0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1):
            raise RecordError(f, n, f"boxes[{i}]", f"normalised box {b} is outside [0, 1] or empty")
        boxes.append([float(v) for v in b])
    return boxes, box_image


_GRID = IntGridFormat(100)


def _check_answer(text: str, f: str, n: int, field: str) -> None:
    """An answer holds no image placeholder, and its boxes are boxes on the 0-100 grid."""
    if IMAGE_PLACEHOLDER in text:
        raise RecordError(f, n, field, f"'{IMAGE_PLACEHOLDER}' in the answer: placeholders belong in the query")
    bad = _GRID.off_grid(text)
    if bad:
        raise RecordError(
            f, n, field, f"box {bad[0]} is not on the 0-100 grid with x1 < x2 and y1 < y2 (boxes in answers: 0-100)"
        )


def _rejected(
    rec: dict, n: int, f: str, root: Path, query: str, answer: str, images: list[str], check_images: bool
) -> Rejected | None:
    """The dispreferred side of a preference record (same query; its own images or None), or None."""
    if rec.get("rejected") is None:
        return None
    rj = rec["rejected"]
    if not isinstance(rj, dict) or not isinstance(rj.get("answer", answer), str):
        raise RecordError(f, n, "rejected", f"expected {{'answer': str, 'images': [paths] | null}}, got {rj!r:.80}")
    if "answer" in rj:
        _check_answer(rj["answer"], f, n, "rejected.answer")
    rj_images = rj.get("images")
    if rj_images is not None:
        if not isinstance(rj_images, list) or len(rj_images) != len(images):
            raise RecordError(
                f, n, "rejected.images", f"expected {len(images)} path(s) or null, got {rj_images!r:.80}"
            )
        rj_images = [str(resolve(root, r, f, n, "rejected.images")) for r in rj_images]
        if check_images:
            for p in rj_images:
                image_size(p, f, n, "rejected.images")
    return Rejected(
        messages=[{"role": "user", "content": query}, {"role": "assistant", "content": rj.get("answer", answer)}],
        images=rj_images,
    )


def convert(rec: dict, n: int, path: Path, root: Path, check_images: bool = True) -> Sample:
    f = str(path)
    rid = require(rec, "id", (str, int), path, n)
    images, sizes = _images(rec, n, path, root, check_images)
    query = require(rec, "query", str, path, n)
    answer = require(rec, "answer", str, path, n)
    _check_answer(answer, f, n, "answer")
    if images and IMAGE_PLACEHOLDER not in query:
        query = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in images) + query
    boxes, box_image = _boxes(rec, n, f, len(images), sizes)
    findings = rec.get("findings") or []
    if not isinstance(findings, list) or len(findings) != len(boxes) or not all(isinstance(x, str) for x in findings):
        raise RecordError(
            f, n, "findings", f"expected {len(boxes)} label string(s), one per box, got {findings!r:.80}"
        )
    rejected = _rejected(rec, n, f, root, query, answer, images, check_images)
    weight = rec.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool):
        raise RecordError(f, n, "weight", f"expected a number, got {weight!r:.80}")
    task = rec.get("task", "localize" if boxes else "vqa_open")
    if not isinstance(task, str) or not task.strip():
        raise RecordError(f, n, "task", f"expected a task name (localize, vqa_closed, ...), got {task!r:.80}")
    short = rec.get("short_answer")
    if short is not None and not isinstance(short, str):
        raise RecordError(
            f, n, "short_answer", f"expected a string or null, got {type(short).__name__}: {short!r:.80}"
        )
    meta = {k: v for k, v in rec.items() if k not in _KNOWN}
    meta.setdefault("source", "mau_jsonl")
    if any(sizes):
        meta["image_sizes"] = [list(s) for s in sizes if s]
    return Sample(
        id=str(rid),
        images=images,
        messages=[{"role": "user", "content": query}, {"role": "assistant", "content": answer}],
        boxes=boxes,
        box_images=list(box_image),
        findings=findings,
        task=task,
        answer=short,
        rejected=rejected,
        weight=float(weight),
        meta=meta,
    )


def read(
    path: str | Path,
    root: str | Path | None = None,
    on_bad_record: str = "raise",
    check_images: bool = True,
    max_tokens: int | None = None,
) -> Records:
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    return collect(
        path,
        iter_json_records(path),
        lambda r, n: convert(r, n, path, root, check_images),
        on_bad_record,
        unique_ids=True,  # an id names one record: a repeat is a bad record, not a second sample
        max_tokens=max_tokens,
    )
