"""STLLaVA-Med DPO JSON (github heliossun/STLLaVA-Med, ``train_dpo.py``).

A JSON array of::

    {"id": "...",                                # optional; the record index when absent
     "image": "pmc/fig.jpg",                     # optional; text-only pairs have none
     "chosen_conversations": [{"from": "human", "value": "<image>\\nDescribe ..."},
                              {"from": "gpt", "value": "..."},
                              {"from": "vuser", "value": "What is ...?"},   # the virtual user
                              {"from": "gpt", "value": "..."}],
     "reject_conversations": [...],              # note: "reject", not "rejected"
     "conversations": [...]}                     # optional; STLLaVA only uses it for lengths

Mapping: ``chosen_conversations`` -> ``messages``; ``reject_conversations`` ->
``Rejected(messages=..., images=None)`` (same image); speakers ``human -> user``,
``gpt -> assistant``, ``vuser -> virtual_user``. ``conversations`` is kept, converted, in
``meta["conversations"]``. Task ``vqa_open``; no short answer. Text is kept as released.
When the non-assistant turns of the two sides differ, ``meta["prompt_differs"] = True``.
"""

from __future__ import annotations

from pathlib import Path

from unveil.data.adapters.base import Records, collect, iter_json_records, require
from unveil.data.adapters.llava import fit_placeholders, record_images, turns_to_messages, unique_ids
from unveil.data.errors import RecordError
from unveil.data.schema import Rejected, Sample

_KNOWN = {"id", "image", "chosen_conversations", "reject_conversations", "conversations"}


def convert(rec: dict, n, path: Path, root: Path, check_images: bool = True, image_dir: str | None = None) -> Sample:
    f = str(path)
    rid = rec.get("id", n)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise RecordError(f, n, "id", f"expected str or int, got {rid!r:.80}")
    if "rejected_conversations" in rec and "reject_conversations" not in rec:
        raise RecordError(
            f,
            n,
            "reject_conversations",
            "missing required field (found 'rejected_conversations': is this an MMedPO file? use format=mmedpo)",
        )
    images = record_images(rec, "image", root, path, n, check_images, image_dir)
    chosen = turns_to_messages(require(rec, "chosen_conversations", list, path, n), path, n, "chosen_conversations")
    reject = turns_to_messages(require(rec, "reject_conversations", list, path, n), path, n, "reject_conversations")
    fit_placeholders(chosen, len(images), path, n, "chosen_conversations", add_missing=False)
    fit_placeholders(reject, len(images), path, n, "reject_conversations", add_missing=False)
    meta = {k: v for k, v in rec.items() if k not in _KNOWN}
    meta["source"] = "stllava_dpo"
    if "id" not in rec:  # the record index: names nothing across files (split-overlap check)
        meta["id_from_position"] = True
    if "conversations" in rec:
        meta["conversations"] = turns_to_messages(rec["conversations"], path, n, "conversations")
    if [m for m in chosen if m["role"] != "assistant"] != [m for m in reject if m["role"] != "assistant"]:
        meta["prompt_differs"] = True
    if any(m["role"] == "virtual_user" for m in chosen):
        meta["has_virtual_user"] = True
    return Sample(
        id=str(rid),
        images=images,
        messages=chosen,
        task="vqa_open",
        rejected=Rejected(messages=reject, images=None),
        meta=meta,
    )


def read(
    path: str | Path,
    root: str | Path | None = None,
    on_bad_record: str = "raise",
    check_images: bool = True,
    image_dir: str | None = None,
    max_tokens: int | None = None,
) -> Records:
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    return unique_ids(
        collect(
            path,
            iter_json_records(path),
            lambda r, n: convert(r, n, path, root, check_images, image_dir),
            on_bad_record,
            max_tokens=max_tokens,
        )
    )
