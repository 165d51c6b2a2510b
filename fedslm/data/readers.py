"""Readers for an institution's own files: CSV and JSONL.

Every failure is a :class:`DataError` naming the file, the line and, where it
applies, the column, so a data steward can fix the record without a traceback.
Rows come back with the line they were read from, so later checks (unknown
label, empty text) can point at the same line.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from fedslm.errors import DataError


@dataclass(frozen=True)
class Row:
    line: int
    values: dict[str, str]


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a .csv or .jsonl file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            f"{path} line {line}: byte {raw[exc.start]:#04x} at character {col} is not UTF-8; "
            "save the file as UTF-8"
        ) from None
    if text.startswith("\ufeff"):  # a BOM written by spreadsheet tools
        text = text[1:]
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


def _require_columns(path: Path, line: int, present: Sequence[str], required: Sequence[str]) -> None:
    missing = [c for c in required if c not in present]
    if missing:
        have = ", ".join(present) if present else "none"
        raise DataError(
            f"{path} line {line}: missing column {', '.join(repr(c) for c in missing)} (columns found: {have})"
        )


def read_csv(path: Path, required: Sequence[str]) -> list[Row]:
    text = _decode(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
    except csv.Error as exc:
        raise DataError(f"{path} line 1: malformed CSV header ({exc})") from None
    _require_columns(path, 1, header, required)
    rows: list[Row] = []
    try:
        start = reader.line_num + 1
        for record in reader:
            if None in record:  # more fields than the header names
                raise DataError(f"{path} line {start}: {len(record[None]) + len(header)} fields, header has {len(header)}")
            values = {k: ("" if v is None else v) for k, v in record.items()}
            rows.append(Row(start, values))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num}: malformed CSV ({exc})") from None
    if not rows:
        raise DataError(f"{path}: no records after the header line")
    return rows


def read_jsonl(path: Path, required: Sequence[str]) -> list[Row]:
    text = _decode(path)
    rows: list[Row] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number}: malformed JSON ({exc.msg} at character {exc.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got {type(obj).__name__}")
        _require_columns(path, number, list(obj), required)
        values: dict[str, str] = {}
        for key, value in obj.items():
            if isinstance(value, (dict, list)):
                if key in required:
                    raise DataError(f"{path} line {number}, column '{key}': expected text, got {type(value).__name__}")
                continue
            values[key] = "" if value is None else str(value)
        rows.append(Row(number, values))
    if not rows:
        raise DataError(f"{path}: no records")
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
    """Columns of a file's first record, to choose between task formats."""
    _reader(path)
    text = _decode(path)
    if path.suffix.lower() == ".csv":
        return next(csv.reader(io.StringIO(text, newline="")), [])
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number}: malformed JSON ({exc.msg} at character {exc.colno})") from None
            return list(obj) if isinstance(obj, dict) else []
    return []
