"""LLaVA / LLaVA-Med conversation JSON and the LLaVA-Med evaluation JSONL.

Instruction data (``.json``, a JSON array)::

    {"id": "PMC-123_fig2",                       # str or int
     "image": "pmc/PMC-123_fig2.jpg",            # optional; str or list of str, relative to root
                                                 # ("images": [...] in Mantis-style records)
     "conversations": [                          # several turns ("conversatons" in LLaVA-Med's alignment data)
        {"from": "human", "value": "<image>\\nWhat does the CT show?"},
        {"from": "gpt",   "value": "A mass in ..."},
        {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "..."}]}

Speakers map ``human -> user``, ``gpt -> assistant``, ``vuser -> virtual_user`` (STLLaVA-Med),
``system -> system``. Placeholders stay where the record puts them; a record with images but
no ``<image>`` at all gets them prepended to its first user turn (``meta["placeholder_added"]``);
any other mismatch between placeholders and images is a RecordError.

Evaluation questions (``.jsonl``, e.g. ``llava_med_eval_qa50_qa.jsonl``)::

    {"question_id": 7, "image": "24867231_F3.jpg", "pair_id": "...",
     "text": "What is shown in the CT?\\n<image>",        # placeholder at the END
     "gpt4_answer": "...", "fig_caption": "...", "in_text_mention": null | [...],
     "domain": {"chest_xray": false, "mri": false, "ct_scan": true, "histology": false, "gross": false},
     "type": "conversation" | "detailed_description", "fig_label": "..."}

As LLaVA-Med's own ``model_vqa.py`` does, the trailing placeholder is moved to the front of the
question (``<image>\\n<question>``); the raw text is kept in ``meta["raw_text"]``. ``domain``
gives ``meta["modality"]`` (the first true domain: chest_xray -> xray, ct_scan -> ct, mri,
histology, gross) and ``meta["domains"]`` (all true ones). ``type`` gives the task
(``conversation -> vqa_open``, ``detailed_description -> describe``).

A ``.jsonl`` file whose records carry ``question_id`` and ``text`` is read as evaluation
questions; anything else as instruction data. The helpers below are shared by the other
LLaVA-style adapters (MMedPO, STLLaVA-Med DPO).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from unveil.data.adapters.base import Records, collect, iter_json_records, require
from unveil.data.errors import RecordError
from unveil.data.images import image_size, resolve
from unveil.data.schema import IMAGE_PLACEHOLDER, Sample

SPEAKERS = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "vuser": "virtual_user",
    "virtual_user": "virtual_user",
    "system": "system",
}

# LLaVA-Med eval `domain` keys -> the modality names used across unveil.
DOMAIN_MODALITY = {"chest_xray": "xray", "ct_scan": "ct", "mri": "mri", "histology": "histology", "gross": "gross"}
EVAL_TYPE_TASK = {"conversation": "vqa_open", "detailed_description": "describe"}

_YES_NO = {"yes", "no"}


# ----------------------------------------------------------------------------------------
# helpers shared by the LLaVA-style adapters
# ----------------------------------------------------------------------------------------
def turns_to_messages(turns: Any, path, n, field: str, strip_assistant: bool = False) -> list[dict[str, str]]:
    """LLaVA ``[{from, value}]`` turns -> ``[{role, content}]`` messages, checked field by field."""
    f = str(path)
    if not isinstance(turns, list) or not turns:
        raise RecordError(f, n, field, f"expected a non-empty list of {{'from', 'value'}} turns, got {turns!r:.80}")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RecordError(f, n, f"{field}[{i}]", f"expected a {{'from', 'value'}} object, got {t!r:.80}")
        who = t.get("from")
        if who is None:
            raise RecordError(f, n, f"{field}[{i}].from", "missing speaker")
        role = SPEAKERS.get(str(who).lower()) if isinstance(who, str) else None
        if role is None:
            raise RecordError(f, n, f"{field}[{i}].from", f"unknown speaker {who!r}; known: {sorted(SPEAKERS)}")
        value = t.get("value")
        if not isinstance(value, str):
            raise RecordError(
                f, n, f"{field}[{i}].value", f"expected a string, got {type(value).__name__}: {value!r:.80}"
            )
        if strip_assistant and role == "assistant":
            value = value.strip()
        if role == "assistant" and IMAGE_PLACEHOLDER in value:
            raise RecordError(
                f, n, f"{field}[{i}].value", f"'{IMAGE_PLACEHOLDER}' in a gpt turn: placeholders go in the human turns"
            )
        out.append({"role": role, "content": value})
    if not any(m["role"] == "assistant" for m in out):
        raise RecordError(f, n, field, "no gpt/assistant turn: nothing to train or score on")
    return out


def n_placeholders(messages: list[dict[str, str]]) -> int:
    return sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages if m["role"] != "assistant")


def fit_placeholders(
    messages: list[dict[str, str]], n_images: int, path, n, field: str, add_missing: bool = True
) -> bool:
    """Check one ``<image>`` per image in the non-assistant turns (in place).

    With ``add_missing`` a record that has images but no placeholder at all gets them at the
    start of its first user turn (returns True); every other mismatch is a RecordError.
    """
    k = n_placeholders(messages)
    if k == n_images:
        return False
    if k == 0 and add_missing:
        for m in messages:
            if m["role"] == "user":
                m["content"] = f"{IMAGE_PLACEHOLDER}\n" * n_images + m["content"]
                return True
    raise RecordError(
        str(path),
        n,
        field,
        f"{k} '{IMAGE_PLACEHOLDER}' placeholder(s) in the non-assistant turns for {n_images} image(s)",
    )


def image_paths(
    rels: list, root: Path, path, n, field: str, check_images: bool, image_dir: str | None = None
) -> list[str]:
    """Resolve relative image paths under the data root (optionally under ``image_dir`` in it)."""
    out = []
    for i, r in enumerate(rels):
        fld = field if len(rels) == 1 and field != "images" else f"{field}[{i}]"
        if not isinstance(r, str):
            raise RecordError(str(path), n, fld, f"expected a relative image path, got {r!r:.80}")
        rel = str(Path(image_dir) / r) if image_dir and r.strip() else r
        p = resolve(root, rel, str(path), n, fld)
        if check_images:
            image_size(p, str(path), n, fld)
        out.append(str(p))
    return out


def record_images(
    rec: dict, key: str, root: Path, path, n, check_images: bool, image_dir: str | None = None
) -> list[str]:
    """``rec[key]`` as a list of resolved paths: absent/None -> [], a str -> [one], a list -> all."""
    v = rec.get(key)
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    elif not isinstance(v, list):
        raise RecordError(str(path), n, key, f"expected a path or a list of paths, got {type(v).__name__}: {v!r:.80}")
    return image_paths(v, root, path, n, key, check_images, image_dir)


def is_yes_no(text: str | None) -> bool:
    return isinstance(text, str) and text.strip().strip(".!").lower() in _YES_NO


def number(rec: dict, key: str, path, n, default=None, low: float | None = None) -> float:
    """A numeric field (bool rejected, optional lower bound)."""
    if key not in rec:
        if default is None:
            raise RecordError(str(path), n, key, "missing required field")
        return float(default)
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        raise RecordError(str(path), n, key, f"expected a finite number, got {v!r:.80}")
    if low is not None and v < low:
        raise RecordError(str(path), n, key, f"must be >= {low}, got {v!r}")
    return float(v)


def unique_ids(samples: list[Sample]) -> list[Sample]:
    """Make ids unique in place: repeats get ``#2``, ``#3``...; the original id stays in meta."""
    counts = Counter(s.id for s in samples)
    seen: Counter = Counter()
    for s in samples:
        if counts[s.id] > 1:
            seen[s.id] += 1
            if seen[s.id] > 1:
                s.meta.setdefault("orig_id", s.id)
                s.id = f"{s.id}#{seen[s.id]}"
    return samples


def modality_name(v: Any) -> str:
    """Normalise modality labels from the various tables to unveil's names (ct, xray, mri, ...)."""
    s = str(v).strip().lower().replace(" ", "").replace("-", "").replace("_", "")
    return {
        "xray": "xray",
        "cxr": "xray",
        "chestxray": "xray",
        "ct": "ct",
        "ctscan": "ct",
        "mri": "mri",
        "mr": "mri",
    }.get(s, str(v).strip().lower())


# ----------------------------------------------------------------------------------------
# the two LLaVA shapes
# ----------------------------------------------------------------------------------------
_CONV_KNOWN = {"id", "image", "images", "conversations", "conversatons"}
# LLaVA-Med's alignment records spell it "conversatons", which LLaVA-Med's own loader accepts
_CONVERSATION_KEYS = ("conversations", "conversatons")


def convert_conversation(
    rec: dict,
    n,
    path: Path,
    root: Path,
    check_images: bool = True,
    image_dir: str | None = None,
    source: str = "llava",
) -> Sample:
    rid = require(rec, "id", (str, int), path, n)
    if "image" in rec and "images" in rec:
        raise RecordError(str(path), n, "images", "both 'image' and 'images' are set: give one")
    key = "images" if "images" in rec else "image"  # Mantis-style records list their images
    images = record_images(rec, key, root, path, n, check_images, image_dir)
    conv = next((k for k in _CONVERSATION_KEYS if k in rec), "conversations")
    messages = turns_to_messages(require(rec, conv, list, path, n), path, n, conv)
    added = fit_placeholders(messages, len(images), path, n, conv)
    meta = {k: v for k, v in rec.items() if k not in _CONV_KNOWN}
    meta.setdefault("source", source)
    if added:
        meta["placeholder_added"] = True
    return Sample(id=str(rid), images=images, messages=messages, task="vqa_open", meta=meta)


_EVAL_KNOWN = {"question_id", "image", "text", "gpt4_answer", "domain", "type"}


def convert_eval(
    rec: dict,
    n,
    path: Path,
    root: Path,
    check_images: bool = True,
    image_dir: str | None = None,
    source: str = "llava_med_eval",
) -> Sample:
    f = str(path)
    qid = require(rec, "question_id", (int, str), path, n)
    images = image_paths([require(rec, "image", str, path, n)], root, path, n, "image", check_images, image_dir)
    raw = require(rec, "text", str, path, n)
    k = raw.count(IMAGE_PLACEHOLDER)
    if k > 1:
        raise RecordError(f, n, "text", f"{k} '{IMAGE_PLACEHOLDER}' placeholders for 1 image")
    question = raw.replace(IMAGE_PLACEHOLDER, "").strip()
    if not question:
        raise RecordError(f, n, "text", "empty question")
    reference = require(rec, "gpt4_answer", str, path, n)
    kind = rec.get("type", "conversation")
    if kind not in EVAL_TYPE_TASK:
        raise RecordError(f, n, "type", f"expected one of {sorted(EVAL_TYPE_TASK)}, got {kind!r:.80}")
    domain = rec.get("domain") or {}
    if not isinstance(domain, dict) or not all(isinstance(v, bool) for v in domain.values()):
        raise RecordError(f, n, "domain", f"expected an object of booleans, got {domain!r:.120}")
    true = [k for k in DOMAIN_MODALITY if domain.get(k)] + [
        k for k, v in domain.items() if v and k not in DOMAIN_MODALITY
    ]
    meta = {k: v for k, v in rec.items() if k not in _EVAL_KNOWN}
    meta.update(
        source=source,
        raw_text=raw,
        type=kind,
        domains=[DOMAIN_MODALITY.get(d, d) for d in true],
        modality=DOMAIN_MODALITY.get(true[0], true[0]) if true else "unknown",
    )
    return Sample(
        id=str(qid),
        images=images,
        messages=[
            {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"},
            {"role": "assistant", "content": reference},
        ],
        task=EVAL_TYPE_TASK[kind],
        answer=None,
        meta=meta,
    )


def _is_eval(rec: Any) -> bool:
    conversation = any(k in rec for k in _CONVERSATION_KEYS) if isinstance(rec, dict) else False
    return isinstance(rec, dict) and "question_id" in rec and "text" in rec and not conversation


def read(
    path: str | Path,
    root: str | Path | None = None,
    on_bad_record: str = "raise",
    check_images: bool = True,
    image_dir: str | None = None,
    max_tokens: int | None = None,
) -> Records:
    """Read LLaVA instruction JSON/JSONL or LLaVA-Med eval JSONL (told apart per record).

    ``image_dir``: folder under ``root`` that the records' image paths are relative to
    (LLaVA's ``--image-folder``); paths still may not leave ``root``.
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent

    def convert(rec, n):
        fn = convert_eval if _is_eval(rec) else convert_conversation
        return fn(rec, n, path, root, check_images, image_dir)

    return unique_ids(collect(path, iter_json_records(path), convert, on_bad_record, max_tokens=max_tokens))
