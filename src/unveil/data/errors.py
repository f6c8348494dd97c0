"""Errors for bad input: every one names the file, the record and the field."""

from __future__ import annotations


class ArrayIndex(int):
    """The 0-based position of a record in a JSON array. An int everywhere else, but an error
    prints it as ``record [3]``: ``file.json:3`` would read as a line number."""


class RecordError(ValueError):
    """A record that cannot become a Sample.

    The message reads ``<file>:<line> field '<field>': <what is wrong>`` for a JSONL line, and
    ``<file> record [<index>] field ...`` for the 0-based position in a JSON array (an
    :class:`ArrayIndex`), so a researcher can jump straight to the bad record.
    """

    def __init__(self, file: str | None, record: int | str | None, field: str | None, message: str):
        self.file, self.record, self.field, self.reason = file, record, field, message
        where = f"{file or '<memory>'}"
        if record is not None:
            if isinstance(record, ArrayIndex):
                where += f" record [{int(record)}]"
            elif isinstance(record, int):
                where += f":{record}"
            else:
                where += f" record {record!r}"
        if field:
            where += f" field '{field}'"
        super().__init__(f"{where}: {message}")
