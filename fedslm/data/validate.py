"""The structure of a node's data file, checked before any record is used.

A careless export is the common case, not the hostile one: a spreadsheet saved as UTF-16 or
Latin-1, a row with one comma too many or too few, a header naming a column twice, a quote that
never closes (which silently swallows every later line into one field), a pasted blob of
megabytes in one cell, a header and nothing else. Python's csv and json modules accept most of
these without a word (a short row is padded, a duplicated column or JSON key keeps its last value),
so the records a node trained on would not be the records its operator meant.

Every reader goes through these functions, so ``fedslm node check``, a node serving a round,
``fedslm train`` and ``fedslm simulate`` (which runs them before Flower starts) refuse the same
files with the same :class:`DataError`: one line naming the file, the 1-based line and the problem.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from pathlib import Path
from typing import Any, NoReturn

from fedslm.errors import DataError

# The longest one field (CSV cell or JSONL value) may be, in characters: Python's csv limit, kept as
# is (raising it would change process-wide state). A model reads a few hundred tokens of a record;
# a field past 128 Ki characters is a pasted blob or a broken quote, never a record.
MAX_FIELD_CHARS = 131_072

# Byte-order marks other than UTF-8's, longest first (UTF-32 LE's begins with UTF-16 LE's).
_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32 (little-endian)"),
    (codecs.BOM_UTF32_BE, "UTF-32 (big-endian)"),
    (codecs.BOM_UTF16_LE, "UTF-16 (little-endian)"),
    (codecs.BOM_UTF16_BE, "UTF-16 (big-endian)"),
)
# Archives a spreadsheet tool may have saved under a .csv name.
_MAGIC = ((b"PK\x03\x04", "a ZIP archive (an .xlsx or .ods workbook?)"), (b"\x1f\x8b", "gzip-compressed"))
# Bytes 0x80-0x9f that Windows-1252 leaves undefined.
_CP1252_UNDEFINED = frozenset(b"\x81\x8d\x8f\x90\x9d")


def _fail(path: Path, line: int | None, problem: str) -> NoReturn:
    raise DataError(f"{path} line {line}: {problem}" if line is not None else f"{path}: {problem}")


def _line_of(raw: bytes, offset: int) -> tuple[int, int]:
    """1-based line and character of byte ``offset``."""
    return raw.count(b"\n", 0, offset) + 1, offset - (raw.rfind(b"\n", 0, offset) + 1) + 1


def _utf16_without_bom(raw: bytes) -> str | None:
    """UTF-16 text of mostly ASCII has a NUL in every other byte."""
    sample = raw[:4096]
    if len(sample) < 4:
        return None
    even, odd = sample[0::2], sample[1::2]
    if odd.count(0) > 0.6 * len(odd) and even.count(0) < 0.1 * len(even):
        return "UTF-16 (little-endian, no byte-order mark)"
    if even.count(0) > 0.6 * len(even) and odd.count(0) < 0.1 * len(odd):
        return "UTF-16 (big-endian, no byte-order mark)"
    return None


def _guess_8bit(raw: bytes) -> str:
    high = {b for b in raw if b >= 0x80}
    if high and not high & _CP1252_UNDEFINED:
        return "it looks like Latin-1 / Windows-1252"
    return "its encoding is not UTF-8"


def decode(path: Path) -> str:
    """The file's text: it must exist, be UTF-8 (a UTF-8 byte-order mark is dropped), hold no NUL
    byte and not be blank. Another encoding is named when it can be told."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        _fail(path, None, "file does not exist")
    except IsADirectoryError:
        _fail(path, None, "is a folder, expected a .csv or .jsonl file")
    except OSError as exc:
        _fail(path, None, f"cannot be read ({exc.strerror})")
    if not raw:
        _fail(path, None, "file is empty (0 bytes)")
    for bom, name in _BOMS:
        if raw.startswith(bom):
            _fail(path, 1, f"the file is {name} text (byte-order mark {bom.hex(' ')}), not UTF-8; save it as UTF-8")
    for magic, name in _MAGIC:
        if raw.startswith(magic):
            _fail(path, 1, f"the file is {name}, not text; export it as a UTF-8 .csv or .jsonl")
    if raw.startswith(codecs.BOM_UTF8):  # written by spreadsheet tools; harmless
        raw = raw[len(codecs.BOM_UTF8):]
    utf16 = _utf16_without_bom(raw)
    if utf16:
        _fail(path, 1, f"the file looks like {utf16} text, not UTF-8; save it as UTF-8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, col = _line_of(raw, exc.start)
        _fail(path, line, f"byte {raw[exc.start]:#04x} at character {col} is not UTF-8 ({_guess_8bit(raw)}); "
                          "save the file as UTF-8")
    nul = raw.find(b"\x00")
    if nul >= 0:
        line, col = _line_of(raw, nul)
        _fail(path, line, f"a NUL byte at character {col}: this is not a text file (binary, or a broken export)")
    if not text.strip():
        _fail(path, None, "file is empty (blank lines only)")
    return text


def _field_too_long(path: Path, line: int, column: str | None, length: int | None) -> NoReturn:
    where = f", column '{column}'" if column else ""
    size = f"of {length:,} characters " if length is not None else ""
    raise DataError(f"{path} line {line}{where}: a field {size}over the cap of {MAX_FIELD_CHARS:,} characters "
                    "(128 KiB of text; a model reads a few hundred tokens): a pasted blob or a quote left open?")


def csv_records(path: Path, text: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and every record of a CSV, each record with the line it starts on. Refused: a
    header naming a column twice, a record with more or fewer fields than the header, a quote left
    open or stray, a field over :data:`MAX_FIELD_CHARS`, no record after the header."""
    # strict: a stray quote is an error (not glued into the field); newline="": quoted line breaks stay in fields.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    header_line = 0
    records: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for fields in reader:
            if not fields:  # a blank line
                start = reader.line_num + 1
                continue
            for i, value in enumerate(fields):
                if len(value) > MAX_FIELD_CHARS:
                    _field_too_long(path, start, header[i] if header and i < len(header) else None, len(value))
            if header is None:
                header, header_line = fields, start
                _check_header(path, start, header)
            elif len(fields) != len(header):
                n = len(fields)
                _fail(path, start, f"{n} field{'s' if n != 1 else ''}, but the header (line {header_line}) has "
                                   f"{len(header)} ({_names(header)}): a missing or extra comma, or an unquoted "
                                   "comma inside a value?")
            else:
                records.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as exc:
        message = str(exc)
        if "field larger than field limit" in message:
            _field_too_long(path, start, None, None)
        if "unexpected end of data" in message:
            _fail(path, start, "a quote opened in this record is never closed (an unterminated \" swallows every "
                               "later line)")
        if "expected after" in message:
            _fail(path, start, f"a stray or unterminated quote in this record ({message}); a quote inside a quoted "
                               "value is written twice (\"\")")
        _fail(path, reader.line_num, f"malformed CSV ({message})")
    if header is None:
        _fail(path, None, "file is empty (blank lines only)")
    if not records:
        _fail(path, None, f"no records after the header (line {header_line})")
    return header, records


def _names(header: list[str]) -> str:
    return ", ".join(header[:8]) + (f", ... ({len(header) - 8} more)" if len(header) > 8 else "")


def _check_header(path: Path, line: int, header: list[str]) -> None:
    if len(header) == 1:
        for sep, name in ((";", "semicolon"), ("\t", "tab"), ("|", "pipe")):
            if sep in header[0]:
                _fail(path, line, f"the header is one column {header[0]!r}: the file looks {name}-separated; save it "
                                  "comma-separated (fedslm reads standard CSV)")
    seen: dict[str, int] = {}
    for i, name in enumerate(header, start=1):
        key = name.strip()
        if key in seen:
            shown = repr(name) if key else "an empty name"
            _fail(path, line, f"the header names column {shown} twice (fields {seen[key]} and {i}); a reader "
                              "would keep only one of them")
        seen[key] = i


def _object_pairs(path: Path, line: int):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                _fail(path, line, f"key {key!r} appears twice in one object; JSON would keep only the last")
            out[key] = value
        return out

    return hook


def _no_constant(path: Path, line: int):
    def hook(name: str) -> Any:
        _fail(path, line, f"{name} is not valid JSON (write a number or a string)")

    return hook


def jsonl_records(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    """Every JSON object of a JSONL file with its line. Refused: a line that is not JSON or not an
    object, a key given twice, NaN/Infinity, a string value over :data:`MAX_FIELD_CHARS`."""
    records: list[tuple[int, dict[str, Any]]] = []
    # Lines end at "\n" only: str.splitlines() would also split at U+2028 and friends, which JSON
    # allows unescaped inside a string.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_object_pairs(path, number),
                             parse_constant=_no_constant(path, number))
        except json.JSONDecodeError as exc:
            hint = ("; JSONL holds one complete object per line: is this a pretty-printed .json file?"
                    if not records and line.strip() in ("[", "{") else "")
            _fail(path, number, f"malformed JSON ({exc.msg} at character {exc.colno}){hint}")
        except RecursionError:
            _fail(path, number, "JSON nested too deeply")
        if not isinstance(obj, dict):
            hint = ("; JSONL holds one object per line, not one array of them"
                    if not records and isinstance(obj, list) and obj and isinstance(obj[0], dict) else "")
            _fail(path, number, f"expected a JSON object, got {type(obj).__name__}{hint}")
        for key, value in obj.items():
            if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
                _field_too_long(path, number, key, len(value))
        records.append((number, obj))
    if not records:
        _fail(path, None, "file is empty (blank lines only)")
    return records
