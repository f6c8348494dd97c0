"""Errors for bad input: every one names the file, the record and the field."""

from __future__ import annotations


class RecordError(ValueError):
    """A record that cannot become a Sample.

    The message always reads ``<file>:<line or record> field '<field>': <what is wrong>`` so
    a researcher can jump straight to the bad line.
    """

    def __init__(self, file: str | None, record: int | str | None, field: str | None, message: str):
        self.file, self.record, self.field, self.reason = file, record, field, message
        where = f"{file or '<memory>'}"
        if record is not None:
            where += f":{record}" if isinstance(record, int) else f" record {record!r}"
        if field:
            where += f" field '{field}'"
        super().__init__(f"{where}: {message}")
