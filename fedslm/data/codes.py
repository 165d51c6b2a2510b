"""Scoring a generated ICD-10-CM answer against the true code: well-formed, valid, right chapter,
right category, exact.

``icd10-instruct`` teaches a causal LM to answer a description with ``" J20.6 (Diseases of the
respiratory system (J00-J99))"``. A completion is read the way a coder would read it: its first
whitespace-separated token, less any trailing ``,;:``, must be a code of the ICD-10-CM shape (a
letter, a digit, a digit or letter — or ``A`` and a digit, as in ``QA0`` — then optionally a dot
and 1–5 digits or letters; every code of the bundled table has it). Its chapter is the one whose
public range (the ``(A00-B99)`` at the end of each chapter name) holds its three-character
category; ranges compare as strings, which orders ICD-10 categories (``C7A`` lies in
``C00-D49``). The chapter text the model writes after the code is not scored: the chapter follows
from the code. A well-formed code is *valid* when it exists in ICD-10-CM (the bundled table's
codes, categories such as ``J20`` included), and in the right *category* when its first three
characters are the true code's.

Constrained decoding (``fedslm.models.generate.AnswerTrie``) lets a model write only
:func:`answer` of a valid code, the way ``icd10-instruct`` spells it after the prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Collection, Optional, Sequence

CODE = re.compile(r"[A-Z](?:[0-9][0-9A-Z]|A[0-9])(?:\.[0-9A-Z]{1,5})?")
_RANGE = re.compile(r"\(([A-Z][0-9A][0-9A-Z])-([A-Z][0-9A][0-9A-Z])\)\s*$")


def answer(code: str) -> str:
    """A code as ``icd10-instruct``'s completions start (``" J20.6"``): the canonical string whose
    tokens constrained decoding allows."""
    return f" {code}"


def read_code(completion: str) -> Optional[str]:
    """The code a completion answers with, or None when its first token is not a well-formed code."""
    parts = completion.split()
    if not parts:
        return None
    match = CODE.fullmatch(parts[0].rstrip(",;:"))
    return match.group(0) if match else None


@dataclass(frozen=True)
class Chapters:
    """The chapter ranges, read from chapter names such as ``Neoplasms (C00-D49)``."""

    ranges: tuple[tuple[str, str, str], ...]  # (first category, last category, chapter name)

    @classmethod
    def from_names(cls, names: Sequence[str]) -> "Chapters":
        ranges = []
        for name in names:
            match = _RANGE.search(name)
            if match is None:
                raise ValueError(f"chapter name {name!r} does not end with a code range such as (A00-B99)")
            ranges.append((match.group(1), match.group(2), name))
        return cls(tuple(ranges))

    def of(self, code: str) -> Optional[str]:
        """The chapter whose range holds the code's category, or None when none does."""
        category = code[:3]
        for first, last, name in self.ranges:
            if first <= category <= last:
                return name
        return None


@dataclass(frozen=True)
class CodeScore:
    records: int
    well_formed: int
    exact: int
    chapter: int
    category: int = 0
    valid: Optional[int] = None  # None: scored without the code list

    def rate(self, count: int) -> float:
        return count / self.records if self.records else 0.0

    def as_dict(self) -> dict[str, Optional[float | int]]:
        return {"records": self.records, "well_formed": self.rate(self.well_formed),
                "valid_code": None if self.valid is None else self.rate(self.valid),
                "right_chapter": self.rate(self.chapter), "right_category": self.rate(self.category),
                "exact_code": self.rate(self.exact)}


def score(completions: Sequence[str], truths: Sequence[str], chapters: Chapters,
          valid: Optional[Collection[str]] = None) -> CodeScore:
    """Counts over paired completions and true codes: well-formed, valid (in ``valid``, the code
    list, when given), in the true chapter, in the true category (first 3 characters), exact. Each
    measure counts any well-formed answer that meets it: a made-up code in the right category counts
    there, not as valid."""
    if len(completions) != len(truths):
        raise ValueError(f"{len(completions)} completions for {len(truths)} true codes")
    well = exact = right = category = real = 0
    for completion, truth in zip(completions, truths):
        code = read_code(completion)
        if code is None:
            continue
        well += 1
        exact += code == truth
        category += code[:3] == truth[:3]
        real += valid is not None and code in valid
        chapter = chapters.of(code)
        right += chapter is not None and chapter == chapters.of(truth)
    return CodeScore(len(truths), well, exact, right, category, None if valid is None else real)
