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
``meta["raw_chosen"]`` / ``meta["raw_rejected"]``); 167 chosen answers of the released SLAKE and
VQA-RAD files (144 + 23) carry leaked generation scaffolding in several shapes::

    "Question: Does the picture contain heart?\\n Yes"                 (no candidates)
    "Question: ...?\\n\\n Pneumothorax"   "Question: ...?\\n- No"   "Question: ...?\\n\\n- Liver Cancer"
    "Question: ...\\n-Original Answer: X\\n-Candidate Answer1: ...\\n ... \\n\\n X"
    "Question: ...    \\n\\n-Original Answer: X    \\n\\n-Candidate Answer1: ...\\n\\n X"  (blank lines between)

With ``clean_scaffolding`` (default) the answer becomes what is left once the question line, the
``Original Answer`` / ``Candidate Answer<k>`` lines, blank lines and a leading ``- `` bullet are
removed (the ``Original Answer`` when nothing is left), flagged ``meta["scaffolding"] = True``.
A rejected answer that talks about the scaffold (the generator's reasoning: "(Note: This answer
is Candidate Answer 2 ...)", "... contradicts the 'Original Answer' ...": 35 in the four files) is
kept as released (it is still a wrong answer) and flagged ``meta["rejected_mentions_scaffold"]``.
Pairs whose chosen and rejected answers are the same text (5 in the SLAKE file) and the same
image teach nothing and are dropped with ``drop_identical`` (default), each named in the log and
counted (``Records.dropped`` of what ``read`` returns, ``data/dropped_identical_pair_<split>`` in
``metrics.json``).
Int or str ids; weight 0.

Task: a yes/no chosen answer -> ``vqa_closed``; a report data set (IU-Xray/MIMIC, told by the
file name) -> ``report``; otherwise ``vqa_open``. ``answer`` is the cleaned chosen answer for
the VQA tasks, None for reports. The human turns of both lists must be the same.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)

_QUESTION = re.compile(r"^\s*Question:")
_SCAFFOLD_LINE = re.compile(r"^\s*-?\s*(?P<kind>Original Answer|Candidate Answer\s*\d*)\s*:(?P<text>.*)$", re.I)
_MENTIONS_SCAFFOLD = re.compile(r"\b(?:Original|Candidate) Answer\b", re.I)
_BULLET = re.compile(r"^-\s+")
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
    """(training text, had scaffolding): strip outer whitespace; drop leaked generation scaffolding
    (the module docstring lists its shapes): the question line, the Original / Candidate Answer
    lines, blank lines and a leading "- " bullet go; the Original Answer stands in when nothing is left."""
    if not (clean_scaffolding and _QUESTION.match(raw)):
        return raw.strip(), False
    original, rest = "", []
    for line in raw.strip().split("\n")[1:]:  # the first line is the question
        m = _SCAFFOLD_LINE.match(line)
        if m:
            if m.group("kind").lower().startswith("original"):
                original = m.group("text").strip()
        elif line.strip():
            rest.append(line.strip())
    return (_BULLET.sub("", "\n".join(rest)).strip() or original), True


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
    if _MENTIONS_SCAFFOLD.search(rejected[ir]["content"]):
        meta["rejected_mentions_scaffold"] = True
    if not chosen[ic]["content"]:
        raise RecordError(f, n, f"conversations[{ic}].value", "empty answer")
    return chosen[ic]["content"]


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


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
    if rj_images is None and not meta.get("rejected_noised") and _same_text(answer, rejected[-1]["content"]):
        meta["identical_pair"] = True  # nothing to prefer: ``read`` drops it (drop_identical)
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
    drop_identical: bool = True,
) -> Records:
    """Read an MMedPO ``*_dpo_weighted.json`` file.

    ``clean_scaffolding=False`` keeps leaked scaffolding in the training text (as released);
    ``task`` overrides the per-record task guess; ``drop_identical=False`` keeps pairs whose
    chosen and rejected sides are the same (as released). What was dropped, by reason, is in
    the returned ``Records.dropped``.
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    samples = collect(
        path,
        iter_json_records(path),
        lambda r, n: convert(r, n, path, root, check_images, image_dir, clean_scaffolding, task),
        on_bad_record,
        max_tokens=max_tokens,
    )
    same = [s for s in samples if s.meta.get("identical_pair")] if drop_identical else []
    if same:
        kept = [s for s in samples if not s.meta.get("identical_pair")]
        samples = Records(kept, skipped=samples.skipped, dropped={"identical_pair": len(same)})
        log.warning(
            "%s: dropped %d pair(s) whose chosen and rejected answers are the same text (nothing to "
            "prefer; drop_identical=false keeps them): ids %s",
            path,
            len(same),
            [s.id for s in same],
        )
    return unique_ids(samples)
