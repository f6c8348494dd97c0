"""MMedPO preference JSON (github aiming-lab/MMedPO; docs/data_formats.md#mmedpo-preference-json).

A JSON array of::

    {"id": 0 | "CXR1000_IM-0003",               # int (SLAKE, VQA-RAD) or str (IU-Xray, MIMIC)
     "image": "xmlab1/source.jpg",              # relative to the data root; shared by many records
     "conversations":          [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": " A"}],
     "rejected_conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": " B"}],
     "weighted_score": 0.8,                     # clinical-relevance weight in [0, 1]; 0 is allowed
     "rejected_image": "noised/xmlab1.jpg",     # optional: a visual pair (noised copy of the image)
     "rejected_noised": 1}                      # optional: 1 = noise the whole image at train time

Mapping: the chosen conversation -> ``messages``; ``rejected_conversations`` ->
``Rejected(messages=..., images=None)``; with ``rejected_image`` -> ``Rejected.images=[path]``;
``rejected_noised`` -> ``meta["rejected_noised"] = True`` (the DPO stage noises the image);
``weighted_score`` -> ``weight`` (raw, as the released code uses it) and
``meta["weighted_score"]`` (the paper's mean-1, clipped rescale is the DPO stage's job, it needs
the whole set).

Quirks handled: answers start with a space or newline (stripped; the raw text is kept in
``meta["raw_chosen"]`` / ``meta["raw_rejected"]``); some chosen answers contain leaked
generation scaffolding (``"Question: ...\\n-Original Answer: X\\n-Candidate Answer1: ...\\n X"``):
with ``clean_scaffolding`` (default) the answer becomes the text after the scaffold (else the
``Original Answer``), flagged ``meta["scaffolding"] = True``; int or str ids; weight 0.

Task: a yes/no chosen answer -> ``vqa_closed``; a report data set (IU-Xray/MIMIC, told by the
file name) -> ``report``; otherwise ``vqa_open``. ``answer`` is the cleaned chosen answer for
the VQA tasks, None for reports. The human turns of both lists must be the same.
"""

from __future__ import annotations

import re
from pathlib import Path

from unveil.data.adapters.base import Records, collect, iter_json_records, require
from unveil.data.adapters.llava import (
    fit_placeholders,
    image_paths,
    is_yes_no,
    number,
    record_images,
    turns_to_messages,
    unique_ids,
)
from unveil.data.errors import RecordError
from unveil.data.schema import Rejected, Sample

_SCAFFOLD = re.compile(
    r"^\s*Question:[^\n]*\n-Original Answer:(?P<orig>[^\n]*)\n"
    r"(?:-Candidate Answer\s*\d+:[^\n]*(?:\n|$))*(?P<rest>.*)$",
    re.S,
)
_REPORT_SETS = ("iuxray", "iu_xray", "iu-xray", "mimic")
_DATASETS = {
    "slake": "slake",
    "vqa-rad": "vqa_rad",
    "vqa_rad": "vqa_rad",
    "vqarad": "vqa_rad",
    "iuxray": "iu_xray",
    "iu_xray": "iu_xray",
    "iu-xray": "iu_xray",
    "mimic": "mimic_cxr",
    "pathvqa": "pathvqa",
}
_KNOWN = {
    "id",
    "image",
    "conversations",
    "rejected_conversations",
    "weighted_score",
    "rejected_image",
    "rejected_noised",
}


def clean_answer(raw: str, clean_scaffolding: bool = True) -> tuple[str, bool]:
    """(training text, had scaffolding): strip outer whitespace; drop leaked generation scaffolding."""
    if clean_scaffolding:
        m = _SCAFFOLD.match(raw)
        if m:
            return (m.group("rest").strip() or m.group("orig").strip()), True
    return raw.strip(), False


def dataset_name(path: Path) -> str:
    stem = path.name.lower()
    for key, name in _DATASETS.items():
        if key in stem:
            return name
    return path.stem


def _last_assistant(messages) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def _clean_answers(chosen: list[dict], rejected: list[dict], meta: dict, clean_scaffolding: bool, f: str, n) -> str:
    """Strip both final answers (scaffolding too, flagged in ``meta``; raw texts kept); returns the chosen one."""
    ic, ir = _last_assistant(chosen), _last_assistant(rejected)
    meta["raw_chosen"], meta["raw_rejected"] = chosen[ic]["content"], rejected[ir]["content"]
    chosen[ic]["content"], leak_c = clean_answer(chosen[ic]["content"], clean_scaffolding)
    rejected[ir]["content"], leak_r = clean_answer(rejected[ir]["content"], clean_scaffolding)
    if leak_c or leak_r:
        meta["scaffolding"] = True
    if not chosen[ic]["content"]:
        raise RecordError(f, n, f"conversations[{ic}].value", "empty answer")
    return chosen[ic]["content"]


def _rejected_images(
    rec: dict, n, path: Path, root: Path, n_images: int, meta: dict, check_images: bool, image_dir: str | None
) -> list[str] | None:
    """The noised copy of a visual pair (None for a text pair); ``rejected_noised`` goes to ``meta``."""
    f = str(path)
    rj_images = None
    if rec.get("rejected_image") is not None:
        rj_images = record_images(rec, "rejected_image", root, path, n, check_images, image_dir)
        if len(rj_images) != n_images:
            raise RecordError(f, n, "rejected_image", f"expected {n_images} path(s), got {len(rj_images)}")
    if "rejected_noised" in rec:
        noised = rec["rejected_noised"]
        if noised not in (0, 1) or isinstance(noised, float):
            raise RecordError(f, n, "rejected_noised", f"expected 0 or 1, got {noised!r:.80}")
        meta["rejected_noised"] = bool(noised)
    return rj_images


def convert(
    rec: dict,
    n,
    path: Path,
    root: Path,
    check_images: bool = True,
    image_dir: str | None = None,
    clean_scaffolding: bool = True,
    task: str | None = None,
) -> Sample:
    f = str(path)
    rid = require(rec, "id", (str, int), path, n)
    if isinstance(rid, bool):
        raise RecordError(f, n, "id", f"expected str or int, got {rid!r}")
    images = image_paths([require(rec, "image", str, path, n)], root, path, n, "image", check_images, image_dir)
    chosen = turns_to_messages(require(rec, "conversations", list, path, n), path, n, "conversations")
    rejected = turns_to_messages(
        require(rec, "rejected_conversations", list, path, n), path, n, "rejected_conversations"
    )
    fit_placeholders(chosen, len(images), path, n, "conversations", add_missing=False)
    fit_placeholders(rejected, len(images), path, n, "rejected_conversations", add_missing=False)
    if [m for m in chosen if m["role"] != "assistant"] != [m for m in rejected if m["role"] != "assistant"]:
        raise RecordError(f, n, "rejected_conversations", "the human turns differ from those of 'conversations'")
    weight = number(rec, "weighted_score", path, n, low=0.0)

    meta = {k: v for k, v in rec.items() if k not in _KNOWN}
    meta.update(source="mmedpo", dataset=dataset_name(path), weighted_score=weight)
    if isinstance(rid, int):
        meta["orig_id"] = rid
    answer = _clean_answers(chosen, rejected, meta, clean_scaffolding, f, n)
    rj_images = _rejected_images(rec, n, path, root, len(images), meta, check_images, image_dir)
    if task is None:
        task = (
            "vqa_closed"
            if is_yes_no(answer)
            else ("report" if any(k in path.name.lower() for k in _REPORT_SETS) else "vqa_open")
        )
    return Sample(
        id=str(rid),
        images=images,
        messages=chosen,
        task=task,
        answer=answer if task in ("vqa_closed", "vqa_open", "mcq") else None,
        rejected=Rejected(messages=rejected, images=rj_images),
        weight=weight,
        meta=meta,
    )


def read(
    path: str | Path,
    root: str | Path | None = None,
    on_bad_record: str = "raise",
    check_images: bool = True,
    image_dir: str | None = None,
    clean_scaffolding: bool = True,
    task: str | None = None,
    max_tokens: int | None = None,
) -> Records:
    """Read an MMedPO ``*_dpo_weighted.json`` file.

    ``clean_scaffolding=False`` keeps leaked scaffolding in the training text (as released);
    ``task`` overrides the per-record task guess.
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    return unique_ids(
        collect(
            path,
            iter_json_records(path),
            lambda r, n: convert(r, n, path, root, check_images, image_dir, clean_scaffolding, task),
            on_bad_record,
            max_tokens=max_tokens,
        )
    )
