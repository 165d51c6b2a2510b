"""Real datasets that ship inside registry packages, so runs work offline.

``icd10``: ICD-10-CM 2026 code descriptions (public CMS data, from the
``icdlookup`` package) labelled with their chapter: 48,671 rows, 22 classes.
``icd10-instruct``: the same rows as prompt/completion pairs for a causal LM
(description -> code and chapter).
``icd10-codes``: the same prompts, answered with the code alone (what `make gemma` trains: a
code is ~7 target tokens against ~25 with the chapter's name, and each target token costs a
262k-way output layer, forward and backward, in every DP step; the chapter follows from the code).

Both use one fixed, seeded train/test split, so every node and every run
agrees on which rows are held out.
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from importlib import resources
from typing import Callable

import numpy as np

from fedslm.data.examples import CausalExample, ClassificationExample, TaskData
from fedslm.errors import DataError
from fedslm.registry import Registry

ICD10_TEST_FRACTION = 0.1
ICD10_SPLIT_SEED = 20_261_130


@dataclass(frozen=True)
class BundledDataset:
    name: str
    task: str
    description: str
    load: Callable[[], TaskData]


DATASETS: Registry[BundledDataset] = Registry("bundled dataset")


def register(dataset: BundledDataset) -> None:
    DATASETS.register(dataset.name, dataset)


def get(name: str) -> BundledDataset | None:
    return DATASETS.get(name)


def names() -> list[str]:
    return DATASETS.names()


def _icd10_rows() -> list[dict[str, str]]:
    try:
        source = resources.files("icdlookup") / "_data" / "icd10_2026.csv.gz"
        with source.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise DataError(f"bundled dataset icd10 needs the 'icdlookup' package ({exc})") from None
    return [r for r in rows if r["description"].strip()]


def icd10_codes() -> frozenset[str]:
    """Every code of the bundled ICD-10-CM table (categories such as ``J20`` and their subcodes): the
    public code list, not records, so a model may be constrained to it whatever it was trained on."""
    return frozenset(r["icd10_code"] for r in _icd10_rows())


def _split(n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(ICD10_SPLIT_SEED).permutation(n)
    n_test = int(round(n * ICD10_TEST_FRACTION))
    return order[n_test:], order[:n_test]


def _chapters(rows: list[dict[str, str]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.setdefault(r["chapter_desc"], None)
    return list(seen)  # file order: chapter A00-B99 first, as in the classification


def load_icd10() -> TaskData:
    rows = _icd10_rows()
    labels = _chapters(rows)
    index = {name: i for i, name in enumerate(labels)}
    examples = [ClassificationExample(r["description"], index[r["chapter_desc"]]) for r in rows]
    train_idx, test_idx = _split(len(examples))
    return TaskData(
        task="classification",
        train=[examples[i] for i in train_idx],
        test=[examples[i] for i in test_idx],
        labels=labels,
        source="icd10",
    )


def _icd10_causal(source: str, with_chapter: bool) -> TaskData:
    rows = _icd10_rows()
    examples = [
        CausalExample(
            prompt=f"ICD-10-CM description: {r['description']}\nCode:",
            completion=f" {r['icd10_code']} ({r['chapter_desc']})" if with_chapter else f" {r['icd10_code']}",
        )
        for r in rows
    ]
    train_idx, test_idx = _split(len(examples))
    return TaskData(
        task="causal_lm",
        train=[examples[i] for i in train_idx],
        test=[examples[i] for i in test_idx],
        source=source,
    )


def load_icd10_instruct() -> TaskData:
    return _icd10_causal("icd10-instruct", with_chapter=True)


def load_icd10_codes() -> TaskData:
    return _icd10_causal("icd10-codes", with_chapter=False)


register(BundledDataset("icd10", "classification", "ICD-10-CM description -> chapter (22 classes)", load_icd10))
register(BundledDataset("icd10-instruct", "causal_lm", "ICD-10-CM description -> code and chapter", load_icd10_instruct))
register(BundledDataset("icd10-codes", "causal_lm", "ICD-10-CM description -> code", load_icd10_codes))
