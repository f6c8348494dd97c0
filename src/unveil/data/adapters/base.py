"""Shared reading helpers for adapters: line-numbered JSON/JSONL, and the bad-record policy."""

from __future__ import annotations

import codecs
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from unveil.data.errors import ArrayIndex, RecordError
from unveil.data.schema import Sample, validate_sample

log = logging.getLogger(__name__)

ON_BAD_RECORD = ("raise", "skip")

# Characters per token that no tokenizer we support averages on text (BPE / SentencePiece
# vocabularies average ~3-5 on English, fewer on other scripts). A record with more than
# max_tokens * CHARS_PER_TOKEN characters of text is refused at load: its tokens would not fit
# however it is tokenized, and training a tokenizer on a 50 MB query hangs for minutes. Records
# under the bound that still exceed max_tokens once tokenized (image tokens included) are cut by
# the collator (SFTCollator.max_length), keeping the start.
CHARS_PER_TOKEN = 8


# A byte that is not UTF-8, decoded with errors="surrogateescape", becomes one lone surrogate
# U+DC80..U+DCFF (0x80..0xff), so the text keeps its line breaks and each bad byte's place.
_UNDECODABLE = re.compile("[\udc80-\udcff]")
UTF8_HINT = "the file must be UTF-8 (re-encode it, e.g. iconv -f latin1 -t utf-8)"


def undecodable_fields(obj: Any, at: str = "") -> tuple[int, str | None]:
    """(how many undecodable bytes, the field holding the first) in a record parsed from text
    decoded with ``surrogateescape``; field paths read ``conversations[1].value``."""
    if isinstance(obj, str):
        return len(_UNDECODABLE.findall(obj)), at or None
    count, first = 0, None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        here = f"{at}[{k}]" if isinstance(k, int) else (f"{at}.{k}" if at else str(k))
        in_key = len(_UNDECODABLE.findall(k)) if isinstance(k, str) else 0
        in_value, field = undecodable_fields(v, here)
        if first is None and (in_key or in_value):
            first = here if in_key else field
        count += in_key + in_value
    return count, first


def undecodable_byte(text: str) -> int | None:
    """The first byte that was not UTF-8 (0x80..0xff) in surrogateescape-decoded text, or None."""
    m = _UNDECODABLE.search(text)
    return None if m is None else ord(m.group()) - 0xDC00


def not_utf8(text: str, k: int) -> tuple[int, str]:
    """(line, message) for the undecodable byte at index ``k`` of surrogateescape-decoded text."""
    start = text.rfind("\n", 0, k) + 1
    col = len(text[start:k].encode("utf-8", "surrogateescape")) + 1
    line = text.count("\n", 0, k) + 1
    return line, f"not valid UTF-8 at byte {col} of the line (0x{ord(text[k]) - 0xDC00:02x}): {UTF8_HINT}"


def _jsonl_line(path: Path, n: int, raw: bytes) -> tuple[int, Any] | None:
    """(n, record or RecordError) of one JSONL line; None for a blank line. A byte that is not
    UTF-8 is a RecordError for this line alone (the bad-record policy applies), naming the field
    when the line still parses."""
    if raw.startswith(codecs.BOM_UTF8):  # an editor's BOM, also mid-file where files were concatenated
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        line, bad = raw.decode("utf-8"), None
    except UnicodeDecodeError:
        line = raw.decode("utf-8", "surrogateescape")
        bad = _UNDECODABLE.search(line).start()
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        if bad is None:
            return n, RecordError(str(path), n, None, f"malformed JSON: {e.msg} at column {e.colno}")
        rec = None
    if bad is not None:
        field = undecodable_fields(rec)[1] if rec is not None else None
        return n, RecordError(str(path), n, field, not_utf8(line, bad)[1])
    return n, rec


def _json_array(path: Path) -> Iterator[tuple[int, Any]]:
    """Records of a JSON array file (a leading BOM is fine). Bytes that are not UTF-8 inside a
    record's strings make that record a RecordError (line and byte named); elsewhere the file
    cannot be parsed and is one error."""
    raw = path.read_bytes()
    try:
        text, bad = raw.decode("utf-8-sig"), []
    except UnicodeDecodeError:
        text = raw.decode("utf-8-sig", "surrogateescape")
        bad = [m.start() for m in _UNDECODABLE.finditer(text)]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        msg = f"malformed JSON: {e.msg} at column {e.colno}"
        if bad:
            line, why = not_utf8(text, bad[0])
            msg += f"; and line {line}: {why}"
        raise RecordError(str(path), e.lineno, None, msg) from None
    if not isinstance(data, list):
        raise RecordError(str(path), None, None, f"expected a JSON array of records, got {type(data).__name__}")
    seen = 0  # undecodable bytes of the records before this one: they come in file order
    for i, rec in enumerate(data):
        count, field = undecodable_fields(rec) if bad else (0, None)
        if count and seen < len(bad):
            line, why = not_utf8(text, bad[seen])
            seen += count
            yield ArrayIndex(i), RecordError(str(path), ArrayIndex(i), field, f"line {line}: {why}")
            continue
        yield ArrayIndex(i), rec


def iter_json_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number or 0-based index, parsed record or RecordError) from a .jsonl or .json
    array file. Files are UTF-8; a BOM is allowed (and dropped)."""
    path = Path(path)
    if not path.exists():
        raise RecordError(str(path), None, None, "file not found")
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:  # bytes: each line is decoded on its own, so one bad byte costs one line
            for n, raw in enumerate(f, start=1):
                got = _jsonl_line(path, n, raw)
                if got is not None:
                    yield got
    else:
        yield from _json_array(path)


def _string_fields(obj: Any, at: str = "") -> Iterator[tuple[str, str]]:
    """(field path, text) of every string in a parsed record, paths as in ``conversations[1].value``."""
    if isinstance(obj, str):
        yield at, obj
    elif isinstance(obj, (dict, list)):
        for k, v in obj.items() if isinstance(obj, dict) else enumerate(obj):
            yield from _string_fields(v, f"{at}[{k}]" if isinstance(k, int) else (f"{at}.{k}" if at else str(k)))


def text_length(s: Sample) -> int:
    """Characters of text in a sample's longer side (chosen or rejected conversation)."""
    sides = [s.messages] + ([s.rejected.messages] if s.rejected is not None and s.rejected.messages else [])
    return max(sum(len(m["content"]) for m in side) for side in sides)


def _too_long(path, n, rec: dict, s: Sample, max_tokens: int) -> RecordError | None:
    chars = text_length(s)
    if chars <= max_tokens * CHARS_PER_TOKEN:
        return None
    field = max(_string_fields(rec), key=lambda kv: len(kv[1]), default=(None, ""))[0]
    return RecordError(
        str(path),
        n,
        field,
        f"{chars:,} characters of text: more than data.max_tokens={max_tokens} tokens can hold "
        f"(at most {max_tokens * CHARS_PER_TOKEN:,} characters, {CHARS_PER_TOKEN} per token)",
    )


def _where(n) -> str:
    return f"record [{int(n)}]" if isinstance(n, ArrayIndex) else f"line {n}"


class Records(list):
    """The samples an adapter read from one file, with how many bad records it skipped
    (``data/skipped_<split>`` in metrics.json) and, by reason, how many good records it left out on
    purpose (``dropped``, e.g. MMedPO's ``identical_pair``: ``data/dropped_<reason>_<split>``)."""

    def __init__(self, samples=(), skipped: int = 0, dropped: dict[str, int] | None = None):
        super().__init__(samples)
        self.skipped = skipped
        self.dropped = dict(dropped or {})


def collect(
    path: str | Path,
    records: Iterator[tuple[int, Any]],
    convert: Callable[[Any, int], Sample | list[Sample]],
    on_bad_record: str = "raise",
    *,
    unique_ids: bool = False,
    max_tokens: int | None = None,
) -> Records:
    """Convert records to Samples under the bad-record policy.

    ``raise`` (default): the first bad record stops loading with a RecordError naming file,
    record and field. ``skip``: bad records are dropped, counted, and the count is logged.
    ``unique_ids``: a Sample whose id an earlier good record of the file already has is a bad
    record (``duplicate of line K``); the first one stays. For formats whose ids name one record
    (MAU JSONL); the released formats that repeat ids make them unique instead (``llava.unique_ids``).
    ``max_tokens``: a record with more text than that many tokens can hold (``CHARS_PER_TOKEN``
    characters each) is a bad record naming its longest field; None: no limit.
    """
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"data.max_tokens must be a positive integer or null, got {max_tokens!r}")
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}")
    out: list[Sample] = []
    skipped: list[str] = []
    first_at: dict[str, int] = {}  # id -> where the good record with it is
    for n, rec in records:
        try:
            if isinstance(rec, RecordError):
                raise rec
            if not isinstance(rec, dict):
                raise RecordError(str(path), n, None, f"expected a JSON object, got {type(rec).__name__}")
            got = convert(rec, n)
            samples = got if isinstance(got, list) else [got]
            for s in samples:  # the whole record is checked before any of its samples is kept
                problems = validate_sample(s)
                if problems:
                    field, msg = problems[0]
                    raise RecordError(str(path), n, field, msg)
                if max_tokens is not None and (long := _too_long(path, n, rec, s, max_tokens)) is not None:
                    raise long
                if unique_ids and s.id in first_at:
                    raise RecordError(str(path), n, "id", f"{s.id!r} is a duplicate of {_where(first_at[s.id])}")
            if unique_ids:
                first_at.update((s.id, n) for s in samples)
            out.extend(samples)
        except RecordError as e:
            if on_bad_record == "raise":
                raise
            skipped.append(str(e))
    if skipped:  # each one named: a user can fix or report the released file
        log.warning(
            "%s: skipped %d bad record(s) (data.on_bad_record=skip):\n  %s", path, len(skipped), "\n  ".join(skipped)
        )
    return Records(out, skipped=len(skipped))


def require(rec: dict, key: str, types, path, n):
    """Fetch a required field with a type check, or raise a RecordError naming it."""
    if key not in rec:
        raise RecordError(str(path), n, key, "missing required field")
    v = rec[key]
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in allowed):  # JSON true is no id
        names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise RecordError(str(path), n, key, f"expected {names}, got {type(v).__name__}: {v!r:.80}")
    return v
