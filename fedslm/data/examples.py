"""The records a task trains on, after reading and before tokenizing."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union


@dataclass(frozen=True)
class ClassificationExample:
    text: str
    label: int
    # Value of federation.partition_column, when institutions are split by a column.
    group: str = ""


@dataclass(frozen=True)
class CausalExample:
    """Loss falls on ``completion`` only; plain text is an empty prompt."""

    prompt: str
    completion: str
    group: str = ""


Example = Union[ClassificationExample, CausalExample]


@dataclass
class TaskData:
    """One node's data for one task: its private training split and held-out split."""

    task: str
    train: list[Example]
    test: list[Example]
    # Classification: the label set every node agrees on, in index order.
    labels: Optional[list[str]] = None
    source: str = ""
    # Names the dataset in the privacy ledger: one accountant per (node, dataset).
    dataset_id: str = field(default="")
    # A simulation's split of ``train`` into its institutions (fedslm.data.partition.Partition), once its main
    # process has computed or read it (fedslm.simulation.preflight.check_data); None elsewhere.
    partitions: Optional[list] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.dataset_id:
            self.dataset_id = dataset_fingerprint(self.source, self.train)


_RECORD_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False)


def dataset_fingerprint(source: str, train: Sequence[Example]) -> str:
    """A stable id of a training set: its name plus a hash of every record."""
    digest = hashlib.sha256()
    encode = _RECORD_JSON.encode  # json.dumps with these options would build an encoder per record
    for example in train:
        digest.update(encode(example.__dict__).encode("utf-8"))
        digest.update(b"\n")
    name = source.replace("\\", "/").rsplit("/", 1)[-1] or "data"
    return f"{name}:{digest.hexdigest()[:16]}"
