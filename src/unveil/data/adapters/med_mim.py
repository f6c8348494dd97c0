"""Med-MIM / Mantis multi-image JSON (github Xikai97/Med-MIM).

A JSON array of::

    {"id": "MS_CXR_T-12",                        # NOT unique, within or across files
     "images": ["mscxr/a.jpg", "Training Images/12_left.jpg"],   # 2-3 paths; spaces allowed
     "conversation": [                            # singular; two turns
        {"role": "user", "content": "<image><image>Which image shows ...?\\nA: the first \\nB: the second"},
        {"role": "assistant", "content": "B: the second"}],
     "source": "MS_CXR_T_vqa_pneumonia"}         # generation batch name

One ``<image>`` per image, all at the start of the user turn; a count mismatch is a RecordError.

The ability comes from the FILE name: ``..._Held_in_{Temporal,Reasoning,Comparison,Coreference}.json``
(benchmark) or ``Med_MIM_train_inherent_Comparison.json`` (instruction data) -> ``meta["ability"]`` =
``temporal`` / ``reasoning`` / ``comparison`` / ``coreference``; ``Med_MIM_train_Composed.json``
(the PMC-15M composed set) -> ``composed``;
the held-out files ``..._Held_out_{ODIR,RAD}.json`` -> ``held_out_odir`` / ``held_out_rad``
(``meta["held_out"] = True``). Pass ``ability=`` for a renamed file; otherwise ``unknown``.

Ids: the Sample id is ``"<ability>/<original id>#<record index>"`` (unique per file; ODIR's
ids are mislabelled ``VQA_RAD-n``); the original stays in ``meta["orig_id"]``.

Task: when the answer is ``"X: <text>"`` and the user turn lists option ``X`` (lines ``A: ...``,
trailing spaces tolerated) -> ``mcq``, ``answer`` = the answer string, options in
``meta["options"]``; a ``multichoice`` source without that shape is a RecordError. Otherwise
``conv`` sources -> ``vqa_open`` (free text, no short answer); other (VQA) sources ->
``vqa_closed`` for yes/no answers, else ``vqa_open``, with ``answer`` = the answer text.
``meta["modality"]`` comes from the source prefix (MS_CXR_T xray, LUMIERE mri, EMBED
mammography, ODIR fundus) when known.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from unveil.data.adapters.base import Records, collect, iter_json_records, require
from unveil.data.adapters.llava import image_paths, is_yes_no, n_placeholders
from unveil.data.errors import RecordError
from unveil.data.schema import IMAGE_PLACEHOLDER, Sample

log = logging.getLogger(__name__)

_ABILITY = re.compile(r"held[_ -]?(in|out)[_ -]?([A-Za-z]+)", re.I)
ABILITIES = ("temporal", "reasoning", "comparison", "coreference")
_OPTION = re.compile(r"^\s*\(?([A-H])\)?\s*[:.)]\s*(.*?)\s*$")
_ANSWER = re.compile(r"^\s*\(?([A-H])\)?\s*:\s*(.*?)\s*$", re.S)
_MODALITY = (("ms_cxr", "xray"), ("mimic", "xray"), ("lumiere", "mri"), ("embed", "mammography"), ("odir", "fundus"))
_KNOWN = {"id", "images", "conversation"}


def ability_from_name(path: Path) -> tuple[str, bool] | None:
    """(ability, held_out) from a Med-MIM file name, or None when the name does not say."""
    m = _ABILITY.search(path.name)
    if not m:  # training files: Med_MIM_train_inherent_Comparison.json, Med_MIM_train_Composed.json
        low = path.name.lower()
        return next(((a, False) for a in (*ABILITIES, "composed") if a in low), None)
    held_out = m.group(1).lower() == "out"
    name = m.group(2).lower()
    if held_out:
        return f"held_out_{name}", True
    return (name, False) if name in ABILITIES else None


def _norm(s: str) -> str:
    return " ".join(s.split()).casefold()


def parse_options(text: str) -> dict[str, str]:
    """Option lines ``A: text`` of a multiple-choice question (letter -> text)."""
    opts: dict[str, str] = {}
    for line in text.replace(IMAGE_PLACEHOLDER, "\n").splitlines():
        m = _OPTION.match(line)
        if m and m.group(1) not in opts:
            opts[m.group(1)] = m.group(2)
    return opts


def _messages(conv: list, f: str, n) -> list[dict[str, str]]:
    """The ``conversation`` turns as messages, each checked for its role and string content."""
    messages = []
    for i, t in enumerate(conv):
        if not isinstance(t, dict):
            raise RecordError(f, n, f"conversation[{i}]", f"expected a {{'role', 'content'}} object, got {t!r:.80}")
        role = t.get("role")
        if role not in ("user", "assistant", "system"):
            raise RecordError(f, n, f"conversation[{i}].role", f"expected 'user' or 'assistant', got {role!r:.80}")
        content = t.get("content")
        if not isinstance(content, str):
            raise RecordError(
                f, n, f"conversation[{i}].content", f"expected a string, got {type(content).__name__}: {content!r:.80}"
            )
        if role == "assistant" and IMAGE_PLACEHOLDER in content:
            raise RecordError(
                f,
                n,
                f"conversation[{i}].content",
                f"'{IMAGE_PLACEHOLDER}' in the answer: placeholders go in the user turn",
            )
        messages.append({"role": role, "content": content})
    return messages


def _task(question: str, raw_answer: str, source: str, meta: dict, f: str, n, answer_turn: int):
    """(task, short answer) as the module docstring says; an mcq also records its options in ``meta``."""
    low = source.lower()
    options = parse_options(question)
    m = _ANSWER.match(raw_answer)
    if m and m.group(1) in options:
        meta["options"], meta["answer_letter"] = options, m.group(1)
        if _norm(m.group(2)) != _norm(options[m.group(1)]):
            meta["answer_option_mismatch"] = True
        return "mcq", raw_answer.strip()
    if "multichoice" in low:
        why = "answer is not 'X: <option>'" if not m else f"option {m.group(1)!r} is not listed in the question"
        raise RecordError(f, n, f"conversation[{answer_turn}].content", f"multiple-choice record ({source}) but {why}")
    if "conv" in low:
        return "vqa_open", None
    answer = raw_answer.strip()
    return ("vqa_closed" if is_yes_no(answer) else "vqa_open"), answer


def convert(
    rec: dict,
    n,
    path: Path,
    root: Path,
    ability: str,
    held_out: bool,
    check_images: bool = True,
    image_dir: str | None = None,
) -> Sample:
    f = str(path)
    rid = require(rec, "id", (str, int), path, n)
    rels = require(rec, "images", list, path, n)
    if not rels:
        raise RecordError(f, n, "images", "empty image list")
    images = image_paths(rels, root, path, n, "images", check_images, image_dir)
    messages = _messages(require(rec, "conversation", list, path, n), f, n)
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not users or not answers:
        raise RecordError(f, n, "conversation", "expected a user turn and an assistant turn")
    k = n_placeholders(messages)
    if k != len(images):
        raise RecordError(
            f,
            n,
            "conversation",
            f"{k} '{IMAGE_PLACEHOLDER}' placeholder(s) in the user turn for {len(images)} image(s)",
        )
    source = rec.get("source", "")
    if not isinstance(source, str):
        raise RecordError(f, n, "source", f"expected a string, got {source!r:.80}")

    meta = {k: v for k, v in rec.items() if k not in _KNOWN}
    meta.update(
        source=source or "med_mim",
        dataset="med_mim",
        ability=ability,
        held_out=held_out,
        orig_id=rid,
        n_images=len(images),
        id_from_position=True,  # Med-MIM ids repeat: the record index makes them unique within the file only
    )
    meta["modality"] = next((mod for key, mod in _MODALITY if key in source.lower()), "unknown")
    question, raw_answer = messages[users[-1]]["content"], messages[answers[-1]]["content"]
    task, answer = _task(question, raw_answer, source, meta, f, n, answers[-1])
    return Sample(id=f"{ability}/{rid}#{n}", images=images, messages=messages, task=task, answer=answer, meta=meta)


def read(
    path: str | Path,
    root: str | Path | None = None,
    on_bad_record: str = "raise",
    check_images: bool = True,
    ability: str | None = None,
    image_dir: str | None = None,
    max_tokens: int | None = None,
) -> Records:
    """Read one Med-MIM ability file. ``ability`` overrides what the file name says."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    held_out = False
    if ability is None:
        got = ability_from_name(path)
        if got is None:
            log.warning(
                "%s: cannot tell the Med-MIM ability from the file name; meta['ability']='unknown' (pass ability=...)",
                path,
            )
            ability = "unknown"
        else:
            ability, held_out = got
    else:
        held_out = ability.startswith("held_out")
    return collect(
        path,
        iter_json_records(path),
        lambda r, n: convert(r, n, path, root, ability, held_out, check_images, image_dir),
        on_bad_record,
        max_tokens=max_tokens,
    )
