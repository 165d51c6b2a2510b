"""Scoring a generated ICD-10-CM answer against the true code: well-formed, exact, right chapter.

``icd10-instruct`` teaches a causal LM to answer a description with ``" J20.6 (Diseases of the
respiratory system (J00-J99))"``. A completion is read the way a coder would read it: its first
whitespace-separated token, less any trailing ``,;:``, must be a code of the ICD-10-CM shape (a
letter, a digit, a digit or letter — or ``A`` and a digit, as in ``QA0`` — then optionally a dot
and 1–5 digits or letters; every code of the bundled table has it). Its chapter is the one whose
public range (the ``(A00-B99)`` at the end of each chapter name) holds its three-character
category; ranges compare as strings, which orders ICD-10 categories (``C7A`` lies in
``C00-D49``). The chapter text the model writes after the code is not scored: the chapter follows
from the code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

CODE = re.compile(r"[A-Z](?:[0-9][0-9A-Z]|A[0-9])(?:\.[0-9A-Z]{1,5})?")
_RANGE = re.compile(r"\(([A-Z][0-9A][0-9A-Z])-([A-Z][0-9A][0-9A-Z])\)\s*$")


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

    def rate(self, count: int) -> float:
        return count / self.records if self.records else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {"records": self.records, "well_formed": self.rate(self.well_formed),
                "exact_code": self.rate(self.exact), "right_chapter": self.rate(self.chapter)}


def score(completions: Sequence[str], truths: Sequence[str], chapters: Chapters) -> CodeScore:
    """Counts over paired completions and true codes: well-formed, exact code, code in the true chapter."""
    if len(completions) != len(truths):
        raise ValueError(f"{len(completions)} completions for {len(truths)} true codes")
    well = exact = right = 0
    for completion, truth in zip(completions, truths):
        code = read_code(completion)
        if code is None:
            continue
        well += 1
        exact += code == truth
        chapter = chapters.of(code)
        right += chapter is not None and chapter == chapters.of(truth)
    return CodeScore(len(truths), well, exact, right)
