"""VQA-RAD / SLAKE / PathVQA question tables: JSON array, JSONL, CSV/TSV or parquet.

One row per question. Columns (names configurable, defaults cover the common releases)::

    image         path relative to the root, raw bytes, or {"bytes": ..., "path": ...}
                  (HF parquet); looked up as image / image_name (VQA-RAD) / img_name (SLAKE)
    question      the question text
    answer        the short answer (numbers, as VQA-RAD has, become strings)
    answer_type   OPEN / CLOSED (any case); when absent, yes/no answers are closed
    qid / id / question_id   optional id; the row number otherwise
    q_lang        SLAKE's language ("en" / "zh"); ``lang="en"`` keeps only English rows

Everything else (SLAKE ``modality`` / ``content_type`` / ``location``, VQA-RAD
``image_organ`` / ``question_type`` ...) goes to ``meta``; ``modality`` is normalised (``X-Ray``
-> ``xray``, ``CT`` -> ``ct``, ``MRI`` -> ``mri``).

Sample: ``[user "<image>\\n<question>", assistant "<answer>"]``, task ``vqa_closed`` /
``vqa_open``, ``answer`` = the short answer. Image bytes are written once, named by their
hash, to ``image_cache`` (default ``<root>/.image_cache``, or a temp folder when the root is
read-only), so every Sample still holds file paths.

Records are named by JSONL line, CSV line, or 0-based row index (JSON arrays, parquet).
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unveil.data.adapters.base import UTF8_HINT, Records, collect, iter_json_records, undecodable_byte
from unveil.data.adapters.llava import image_paths, is_yes_no, modality_name, unique_ids
from unveil.data.errors import RecordError
from unveil.data.images import decode_fully
from unveil.data.schema import IMAGE_PLACEHOLDER, Sample

log = logging.getLogger(__name__)

IMAGE_KEYS = ("image", "image_name", "img_name", "image_path", "img_path")
ID_KEYS = ("qid", "id", "question_id")
_ANSWER_TYPES = {"closed": "vqa_closed", "open": "vqa_open"}


# ----------------------------------------------------------------------------------------
# rows from the four container formats
# ----------------------------------------------------------------------------------------
def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[int, Any]]:
    """Rows of a UTF-8 CSV/TSV (a BOM is dropped). A cell holding bytes that are not UTF-8 makes its
    row a RecordError naming the line and the column; the other rows are read as usual."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        bad = [b for b in map(undecodable_byte, reader.fieldnames or []) if b is not None]
        if bad:
            raise RecordError(str(path), 1, None, f"header not valid UTF-8 (byte 0x{bad[0]:02x}): {UTF8_HINT}")
        for row in reader:
            if None in row:  # more cells than header columns
                yield (
                    reader.line_num,
                    RecordError(
                        str(path),
                        reader.line_num,
                        None,
                        f"{len(row[None])} cell(s) more than the header's {len(reader.fieldnames)}",
                    ),
                )
                continue
            bad = [(k, b) for k, v in row.items() if isinstance(v, str) and (b := undecodable_byte(v)) is not None]
            if bad:
                msg = f"not valid UTF-8 (byte 0x{bad[0][1]:02x}): {UTF8_HINT}"
                yield reader.line_num, RecordError(str(path), reader.line_num, bad[0][0], msg)
                continue
            yield reader.line_num, row


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is in requirements.txt
        raise RecordError(str(path), None, None, "reading parquet needs pyarrow (pip install pyarrow)") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise RecordError(str(path), None, None, f"unreadable parquet file: {e}") from None
    i = 0
    for batch in pf.iter_batches(batch_size=512):
        for row in batch.to_pylist():
            yield i, row
            i += 1


def iter_rows(path: Path, table_format: str | None = None) -> Iterator[tuple[int, Any]]:
    fmt = (table_format or path.suffix.lstrip(".")).lower()
    if not path.exists():
        raise RecordError(str(path), None, None, "file not found")
    if fmt in ("json", "jsonl"):
        return iter_json_records(path)
    if fmt in ("csv", "tsv"):
        return _csv_rows(path, "\t" if fmt == "tsv" else ",")
    if fmt in ("parquet", "pq"):
        return _parquet_rows(path)
    raise RecordError(
        str(path), None, None, f"unknown table format {fmt!r}: expected json, jsonl, csv, tsv or parquet"
    )


# ----------------------------------------------------------------------------------------
# images given as bytes
# ----------------------------------------------------------------------------------------
def _cache_dir(root: Path, image_cache: str | Path | None) -> Path:
    if image_cache is not None:
        d = Path(image_cache)
        d.mkdir(parents=True, exist_ok=True)
        return d
    d = root / ".image_cache"
    try:
        d.mkdir(parents=True, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    d = Path(tempfile.gettempdir()) / "unveil_image_cache"
    d.mkdir(parents=True, exist_ok=True)
    return d


def cache_bytes(data: bytes, cache: Path, name_hint: str | None, file: str, n, field: str, check: bool) -> str:
    """Write image bytes once (content-addressed, atomic) and return the file's path."""
    from PIL import Image

    suffix = Path(name_hint).suffix.lower() if name_hint else ""
    if check or not suffix:
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = (im.format or "").lower()
                if check:  # decoded fully, as for image files (images.image_size): truncation shows
                    decode_fully(im)
        except Exception as e:
            raise RecordError(
                file,
                n,
                field,
                f"undecodable image bytes ({len(data)} bytes): cannot decode (truncated or corrupt): {e}",
            ) from None
        suffix = suffix or {"jpeg": ".jpg", "png": ".png", "bmp": ".bmp", "tiff": ".tif", "gif": ".gif"}.get(
            fmt, f".{fmt or 'img'}"
        )
    out = cache / f"{hashlib.sha1(data).hexdigest()[:20]}{suffix}"
    if not out.exists():
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".part")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, out)
    return str(out)


# ----------------------------------------------------------------------------------------
# one row -> one Sample
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Columns:
    """Which column holds what; ``read``'s ``*_key`` options. None: the first of IMAGE_KEYS / ID_KEYS there."""

    image: str | None = None
    question: str = "question"
    answer: str = "answer"
    answer_type: str = "answer_type"
    id: str | None = None

    def image_key(self, rec: dict) -> str | None:
        return self.image or next((k for k in IMAGE_KEYS if k in rec), None)


def _images(rec: dict, n, path: Path, root: Path, cache: Path | None, cols: Columns, check_images: bool, image_dir):
    """(the image column's name, [image path]): a path under the root, or bytes written to the cache."""
    f = str(path)
    ikey = cols.image_key(rec)
    if ikey is None or ikey not in rec:
        raise RecordError(
            f, n, cols.image or "image", f"missing image column (looked for {cols.image or '/'.join(IMAGE_KEYS)})"
        )
    img = rec[ikey]
    name_hint = None
    if isinstance(img, dict):  # HF datasets' Image feature: {"bytes": b"..." | None, "path": "..."}
        name_hint = img.get("path")
        img = img.get("bytes") if img.get("bytes") is not None else img.get("path")
    if isinstance(img, (bytes, bytearray, memoryview)):
        if cache is None:
            raise RecordError(f, n, ikey, "image bytes need an image cache folder")
        return ikey, [cache_bytes(bytes(img), cache, name_hint, f, n, ikey, check_images)]
    if isinstance(img, str):
        return ikey, image_paths([img], root, path, n, ikey, check_images, image_dir)
    raise RecordError(
        f, n, ikey, f"expected a path, image bytes or {{'bytes', 'path'}}, got {type(img).__name__}: {img!r:.80}"
    )


def _question(rec: dict, n, f: str, key: str) -> str:
    if key not in rec:
        raise RecordError(f, n, key, "missing required field")
    question = rec[key]
    if not isinstance(question, str) or not question.strip():
        raise RecordError(f, n, key, f"expected a non-empty string, got {question!r:.80}")
    return question


def _answer(rec: dict, n, f: str, key: str) -> tuple[Any, str]:
    """(the raw cell, the answer text): numbers become strings (VQA-RAD has some), 2.0 -> "2"."""
    if key not in rec:
        raise RecordError(f, n, key, "missing required field")
    answer = rec[key]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise RecordError(f, n, key, f"expected a string (or number), got {type(answer).__name__}: {answer!r:.80}")
    raw_answer = answer
    answer = (str(int(answer)) if isinstance(answer, float) and answer.is_integer() else str(answer)).strip()
    if not answer:
        raise RecordError(f, n, key, "empty answer")
    if IMAGE_PLACEHOLDER in answer:
        raise RecordError(f, n, key, f"'{IMAGE_PLACEHOLDER}' in the answer: placeholders go in the question")
    return raw_answer, answer


def _task(atype: Any, answer: str, n, f: str, key: str) -> str:
    """vqa_closed / vqa_open from the answer type column; without one, yes/no answers are closed."""
    if atype is None or (isinstance(atype, str) and not atype.strip()):
        return "vqa_closed" if is_yes_no(answer) else "vqa_open"
    if isinstance(atype, str) and atype.strip().lower() in _ANSWER_TYPES:
        return _ANSWER_TYPES[atype.strip().lower()]
    raise RecordError(f, n, key, f"expected OPEN or CLOSED, got {atype!r:.80}")


def _record_id(rec: dict, n, f: str, id_key: str | None):
    """(id, from the position): the row's id column (the first of ID_KEYS with a value unless
    named), else the record number."""
    ikey_id = id_key or next((k for k in ID_KEYS if rec.get(k) not in (None, "")), None)
    if ikey_id is None:
        return n, True
    rid = rec.get(ikey_id)
    if rid is None or isinstance(rid, (bool, dict, list)):
        raise RecordError(f, n, ikey_id, f"expected an id, got {rid!r:.80}")
    return rid, False


def convert(
    rec: dict,
    n,
    path: Path,
    root: Path,
    cache: Path | None,
    check_images: bool = True,
    cols: Columns = Columns(),
    image_dir: str | None = None,
) -> Sample:
    f = str(path)
    ikey, images = _images(rec, n, path, root, cache, cols, check_images, image_dir)
    question = _question(rec, n, f, cols.question)
    raw_answer, answer = _answer(rec, n, f, cols.answer)
    atype = rec.get(cols.answer_type)
    task = _task(atype, answer, n, f, cols.answer_type)
    k = question.count(IMAGE_PLACEHOLDER)
    if k > 1:
        raise RecordError(f, n, cols.question, f"{k} '{IMAGE_PLACEHOLDER}' placeholders for 1 image")
    prompt = question if k == 1 else f"{IMAGE_PLACEHOLDER}\n{question}"
    rid, positional = _record_id(rec, n, f, cols.id)

    drop = {ikey, cols.question, cols.answer, cols.answer_type}
    meta = {k: v for k, v in rec.items() if k not in drop and not isinstance(v, (bytes, bytearray, memoryview, dict))}
    meta.setdefault("source", "vqa_table")
    if positional:  # no id column: the row number names nothing across files (split-overlap check)
        meta["id_from_position"] = True
    if atype is not None:
        meta["answer_type"] = atype
    if raw_answer != answer:
        meta["raw_answer"] = raw_answer
    if meta.get("modality") is not None:
        meta["modality"] = modality_name(meta["modality"])
    return Sample(
        id=str(rid),
        images=images,
        messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        task=task,
        answer=answer,
        meta=meta,
    )


def _where_matches(rec: dict, where: dict) -> bool:
    """Whether a row passes ``where``: {column: pattern or [patterns]}, shell-style (``test_*``); a
    pattern starting with ``!`` excludes. A row passes when, for every column, its value matches a
    plain pattern (if any is given) and no ``!`` pattern."""
    for col, pats in where.items():
        value = str(rec.get(col, "")).strip()
        pats = [pats] if isinstance(pats, str) else list(pats)
        keep = [p for p in pats if not p.startswith("!")]
        if keep and not any(fnmatch.fnmatchcase(value, p) for p in keep):
            return False
        if any(fnmatch.fnmatchcase(value, p[1:]) for p in pats if p.startswith("!")):
            return False
    return True


def _rows_in(path: Path, table_format: str | None, lang: str | None, lang_key: str, where: dict, dropped: dict):
    """The table's rows; rows in another language than ``lang`` or outside ``where`` are left out and
    counted in ``dropped`` (``other_language``, ``where``)."""
    for n, rec in iter_rows(path, table_format):
        if lang is not None and isinstance(rec, dict):
            if lang_key not in rec:
                yield (
                    n,
                    RecordError(str(path), n, lang_key, f"missing language field (lang={lang!r} was asked for)"),
                )
                continue
            if str(rec[lang_key]).strip().lower() != str(lang).lower():
                dropped["other_language"] = dropped.get("other_language", 0) + 1
                continue
        if where and isinstance(rec, dict) and not _where_matches(rec, where):
            dropped["where"] = dropped.get("where", 0) + 1
            continue
        yield n, rec


def read(
    path: str | Path,
    root: str | Path | None = None,
    on_bad_record: str = "raise",
    check_images: bool = True,
    *,
    image_key: str | None = None,
    question_key: str = "question",
    answer_key: str = "answer",
    answer_type_key: str = "answer_type",
    id_key: str | None = None,
    lang: str | None = None,
    lang_key: str = "q_lang",
    image_dir: str | None = None,
    image_cache: str | Path | None = None,
    table_format: str | None = None,
    max_tokens: int | None = None,
    where: dict | None = None,
) -> Records:
    """Read a VQA table. ``lang`` keeps only rows whose ``lang_key`` equals it (SLAKE: "en").

    ``image_dir``: folder under ``root`` the image names are relative to (SLAKE ``imgs``,
    VQA-RAD ``VQA_RAD Image Folder``); ``table_format`` overrides the file suffix; ``where``
    keeps the rows whose columns match shell-style patterns, ``!`` excluding (VQA-RAD's one file:
    ``{"phrase_type": "test_*"}`` is its test split, ``{"phrase_type": "!test_*"}`` the rest).
    What was left out, by reason, is in the returned ``Records.dropped`` (``filtered``: the rows in
    other languages).
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    cols = Columns(image=image_key, question=question_key, answer=answer_key, answer_type=answer_type_key, id=id_key)
    cache: Path | None = None
    dropped: dict[str, int] = {}

    def conv(rec, n):
        nonlocal cache
        # the cache folder is made only when a row holds image bytes
        ikey = cols.image_key(rec)
        v = rec.get(ikey) if ikey else None
        if cache is None and (
            isinstance(v, (bytes, bytearray, memoryview)) or (isinstance(v, dict) and v.get("bytes") is not None)
        ):
            cache = _cache_dir(root, image_cache)
        return convert(rec, n, path, root, cache, check_images, cols, image_dir)

    rows = _rows_in(path, table_format, lang, lang_key, dict(where or {}), dropped)
    out = collect(path, rows, conv, on_bad_record, max_tokens=max_tokens)
    if dropped.get("other_language"):
        log.info(
            "%s: kept rows with %s=%r, left out %d in other languages", path, lang_key, lang, dropped["other_language"]
        )
    if dropped.get("where"):
        log.info("%s: kept rows matching %s, left out %d others", path, where, dropped["where"])
    out.filtered = dropped.get("other_language", 0)  # rows left out for their language (not bad records)
    out.dropped = dropped  # by reason: data/dropped_<reason>_<split> in metrics.json
    return unique_ids(out)
