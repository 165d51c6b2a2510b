"""Split one dataset into simulated institutions with flwr-datasets' partitioners.

``iid`` (IidPartitioner), ``dirichlet`` (DirichletPartitioner over labels: the
label skew real institutions have) and ``column`` (NaturalIdPartitioner: one
institution per distinct value of a column, e.g. a hospital id). Each
institution then holds out part of its own records as its local test set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from fedslm.config.schema import FederationConfig
from fedslm.data.examples import Example, TaskData
from fedslm.errors import ConfigError
from fedslm.registry import Registry

log = logging.getLogger(__name__)


def _targets(examples: list[Example]) -> list[str]:
    # Causal examples have no label; Dirichlet over labels needs one.
    return [str(getattr(e, "label", "")) for e in examples]


def _dataset(examples: list[Example]):
    from datasets import Dataset

    class Columns(Dataset):
        """A dataset whose whole columns come out as numpy arrays: the partitioners read one with
        np.array(dataset[column]), which datasets 4 hands over row by row (seconds for 40k records).
        The values, hence the partitions, are the same (tests/test_partition.py)."""

        def __getitem__(self, key):  # type: ignore[override]
            if isinstance(key, str) and self._indices is None:  # a selection goes through its index mapping
                return self.data.column(key).to_numpy(zero_copy_only=False)
            return super().__getitem__(key)

    plain = Dataset.from_dict({
        "idx": list(range(len(examples))),
        "label": _targets(examples),
        "group": [e.group for e in examples],
    })
    return Columns(plain.data, info=plain.info, split=plain.split)


def _iid(fed: FederationConfig):
    from flwr_datasets.partitioner import IidPartitioner

    return IidPartitioner(num_partitions=fed.num_clients)


def _dirichlet(fed: FederationConfig):
    from flwr_datasets.partitioner import DirichletPartitioner

    return DirichletPartitioner(
        num_partitions=fed.num_clients, partition_by="label", alpha=fed.dirichlet_alpha,
        min_partition_size=10, self_balancing=False, shuffle=True, seed=fed.partition_seed,
    )


def _column(fed: FederationConfig):
    from flwr_datasets.partitioner import NaturalIdPartitioner

    return NaturalIdPartitioner(partition_by="group")


PARTITIONERS: Registry[Callable[[FederationConfig], object]] = Registry("partitioner")
PARTITIONERS.register("iid", _iid)
PARTITIONERS.register("dirichlet", _dirichlet)
PARTITIONERS.register("column", _column)


@dataclass(frozen=True)
class Partition:
    institution: int
    num_institutions: int
    indices: list[int]
    name: str


def partition_indices(examples: list[Example], fed: FederationConfig,
                      only: Optional[int] = None) -> list[Partition]:
    """Indices of ``examples`` held by each institution (or just institution ``only``)."""
    if fed.partitioner == "dirichlet" and not hasattr(examples[0], "label"):
        raise ConfigError("federation.partitioner=dirichlet splits by label; causal LM data has none (use iid or column)")
    if fed.partitioner == "column":
        groups = sorted({e.group for e in examples})
        if len(groups) != fed.num_clients:
            raise ConfigError(
                f"federation.partition_column '{fed.partition_column}' has {len(groups)} distinct values; "
                f"set federation.num_clients={len(groups)}"
            )
    if len(examples) < 10 * fed.num_clients:
        raise ConfigError(
            f"federation.num_clients={fed.num_clients} is too many for {len(examples)} records (need >= 10 each)"
        )
    partitioner = PARTITIONERS[fed.partitioner](fed)
    partitioner.dataset = _dataset(examples)
    out = []
    for i in range(fed.num_clients) if only is None else [only]:
        part = partitioner.load_partition(i)
        name = f"institution-{i}"
        if fed.partitioner == "column":
            name = str(part[0]["group"]) if len(part) else name
        indices = sorted(part.to_dict()["idx"])
        out.append(Partition(i, fed.num_clients, indices, name))
    return out


# What a partition depends on besides the records (named by the dataset's fingerprint).
_SPLIT_FIELDS = ("partitioner", "num_clients", "dirichlet_alpha", "partition_seed", "partition_column")
PARTITIONS_FORMAT = "fedslm-partitions-1"


def partitions_file(folder: Path, dataset_id: str, fed: FederationConfig) -> Path:
    """Where a simulation keeps its partition of ``dataset_id`` under ``fed`` (content-addressed: other
    records or another split are another file)."""
    split = {k: getattr(fed, k) for k in _SPLIT_FIELDS}
    key = hashlib.sha256(json.dumps({"dataset": dataset_id, "split": split}, sort_keys=True).encode()).hexdigest()
    return folder / f"partitions-{key[:32]}.json"


def save_partitions(path: Path, parts: list[Partition]) -> None:
    """A simulation computes its partition once, before Flower starts; its ClientApps read it instead of
    importing flwr-datasets and splitting again in every Ray actor."""
    data = {"format": PARTITIONS_FORMAT,
            "institutions": [{"institution": p.institution, "name": p.name, "indices": p.indices} for p in parts]}
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def load_partitions(path: Path, records: int, fed: FederationConfig) -> Optional[list[Partition]]:
    """The partition in ``path``, or None when absent or not one of ``records`` records into
    ``fed.num_clients`` disjoint shares (then the caller splits itself)."""
    if not path.is_file():
        return None
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
        rows = data["institutions"]
        ok = data.get("format") == PARTITIONS_FORMAT and isinstance(rows, list) and len(rows) == fed.num_clients
        parts, seen = [], 0
        for i, row in enumerate(rows if ok else []):
            idx = row["indices"]
            if not (row["institution"] == i and isinstance(row["name"], str) and isinstance(idx, list)
                    and all(type(k) is int and 0 <= k < records for k in idx) and idx == sorted(set(idx))):
                ok = False
                break
            seen += len(idx)
            parts.append(Partition(i, fed.num_clients, idx, row["name"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("partition file %s unreadable (%s); splitting again", path, exc)
        return None
    if not ok or seen > records or len({k for p in parts for k in p.indices}) != seen:
        log.warning("partition file %s does not fit this dataset and split; splitting again", path)
        return None
    return parts


def institution_data(data: TaskData, fed: FederationConfig, institution: int, test_fraction: float,
                     split_seed: int, max_test: Optional[int] = None,
                     partitions: Optional[list[Partition]] = None) -> TaskData:
    """Institution ``institution``'s records, split into its own train and held-out sets. ``partitions``:
    :func:`partition_indices` of ``data.train`` under ``fed`` for every institution, when already known."""
    part = partitions[institution] if partitions is not None else partition_indices(data.train, fed, only=institution)[0]
    order = np.random.default_rng([split_seed, institution]).permutation(len(part.indices))
    n_test = max(1, int(round(len(order) * test_fraction)))
    records = [data.train[part.indices[k]] for k in order]
    return TaskData(
        task=data.task,
        train=records[n_test:],
        test=records[:n_test][:max_test] if max_test else records[:n_test],
        labels=data.labels,
        source=f"{data.source}#{part.name}",
    )
