"""Readers for an institution's own files: CSV and JSONL.

Every failure is a :class:`DataError` naming the file, the line and, where it
applies, the column, so a data steward can fix the record without a traceback.
The file's structure (encoding, ragged rows, duplicate columns, quotes, field
sizes) is checked by :mod:`fedslm.data.validate` before any row is used.
Rows come back with the line they were read from, so later checks (unknown
label, empty text) can point at the same line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from fedslm.data import validate
from fedslm.errors import DataError


@dataclass(frozen=True)
class Row:
    line: int
    values: dict[str, str]


def _require_columns(path: Path, line: int, present: Sequence[str], required: Sequence[str]) -> None:
    missing = [c for c in required if c not in present]
    if missing:
        have = ", ".join(present) if present else "none"
        raise DataError(
            f"{path} line {line}: missing column {', '.join(repr(c) for c in missing)} (columns found: {have})"
        )


def read_csv(path: Path, required: Sequence[str]) -> list[Row]:
    header, records = validate.csv_records(path, validate.decode(path))
    _require_columns(path, 1, header, required)
    return [Row(line, dict(zip(header, fields))) for line, fields in records]


def read_jsonl(path: Path, required: Sequence[str]) -> list[Row]:
    rows: list[Row] = []
    for number, obj in validate.jsonl_records(path, validate.decode(path)):
        _require_columns(path, number, list(obj), required)
        values: dict[str, str] = {}
        for key, value in obj.items():
            if isinstance(value, (dict, list)):
                if key in required:
                    raise DataError(f"{path} line {number}, column '{key}': expected text, got {type(value).__name__}")
                continue
            values[key] = "" if value is None else str(value)
        rows.append(Row(number, values))
    return rows


_READERS: dict[str, Callable[[Path, Sequence[str]], list[Row]]] = {
    ".csv": read_csv,
    ".jsonl": read_jsonl,
}


def _reader(path: Path) -> Callable[[Path, Sequence[str]], list[Row]]:
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(_READERS)}")
    return reader


def read_rows(path: Path, required: Sequence[str]) -> list[Row]:
    """Read a .csv or .jsonl file, checking that ``required`` columns exist on every row."""
    return _reader(path)(path, required)


def header_columns(path: Path) -> list[str]:
    """Columns of a file's first record, to choose between task formats (the whole file is validated)."""
    _reader(path)
    text = validate.decode(path)
    if path.suffix.lower() == ".csv":
        return validate.csv_records(path, text)[0]
    return list(validate.jsonl_records(path, text)[0][1])
