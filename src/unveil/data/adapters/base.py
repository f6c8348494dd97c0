"""Shared reading helpers for adapters: line-numbered JSON/JSONL, and the bad-record policy."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from unveil.data.errors import ArrayIndex, RecordError
from unveil.data.schema import Sample, validate_sample

log = logging.getLogger(__name__)

ON_BAD_RECORD = ("raise", "skip")


def iter_json_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number or 0-based index, parsed record) from a .jsonl or .json array file."""
    path = Path(path)
    if not path.exists():
        raise RecordError(str(path), None, None, "file not found")
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, RecordError(str(path), n, None, f"malformed JSON: {e.msg} at column {e.colno}")
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RecordError(str(path), e.lineno, None, f"malformed JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(data, list):
            raise RecordError(str(path), None, None, f"expected a JSON array of records, got {type(data).__name__}")
        for i, rec in enumerate(data):
            yield ArrayIndex(i), rec


def collect(
    path: str | Path,
    records: Iterator[tuple[int, Any]],
    convert: Callable[[Any, int], Sample | list[Sample]],
    on_bad_record: str = "raise",
) -> list[Sample]:
    """Convert records to Samples under the bad-record policy.

    ``raise`` (default): the first bad record stops loading with a RecordError naming file,
    record and field. ``skip``: bad records are dropped, counted, and the count is logged.
    """
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}")
    out: list[Sample] = []
    skipped: list[str] = []
    for n, rec in records:
        try:
            if isinstance(rec, RecordError):
                raise rec
            if not isinstance(rec, dict):
                raise RecordError(str(path), n, None, f"expected a JSON object, got {type(rec).__name__}")
            got = convert(rec, n)
            for s in got if isinstance(got, list) else [got]:
                problems = validate_sample(s)
                if problems:
                    field, msg = problems[0]
                    raise RecordError(str(path), n, field, msg)
                out.append(s)
        except RecordError as e:
            if on_bad_record == "raise":
                raise
            skipped.append(str(e))
    if skipped:
        log.warning(
            "%s: skipped %d bad record(s) (data.on_bad_record=skip); first: %s", path, len(skipped), skipped[0]
        )
    collect.last_skipped = len(skipped)  # read by the datamodule to log the count as a metric
    return out


collect.last_skipped = 0


def require(rec: dict, key: str, types, path, n):
    """Fetch a required field with a type check, or raise a RecordError naming it."""
    if key not in rec:
        raise RecordError(str(path), n, key, "missing required field")
    v = rec[key]
    if not isinstance(v, types):
        names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise RecordError(str(path), n, key, f"expected {names}, got {type(v).__name__}: {v!r:.80}")
    return v
