"""Turn ``data.*`` config into a node's :class:`TaskData`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from fedslm.config.schema import DataConfig
from fedslm.data import bundled
from fedslm.data.examples import TaskData
from fedslm.data.readers import header_columns, read_rows
from fedslm.data.tasks import get_task
from fedslm.errors import ConfigError, DataError


def load_task_data(data: DataConfig, task: str, group_column: Optional[str] = None) -> TaskData:
    """The bundled dataset named by ``data.source``, or a node's own .csv/.jsonl file.

    ``group_column`` keeps that column's value on every example (to split institutions by it).
    """
    spec = bundled.get(data.source)
    if spec is not None:
        if group_column:
            raise ConfigError(
                f"federation.partition_column '{group_column}' needs a .csv/.jsonl data.source with that column; "
                f"bundled '{data.source}' has none (use federation.partitioner=dirichlet or iid)"
            )
        if spec.task != task:
            raise ConfigError(
                f"data.source '{data.source}' is a {spec.task} dataset but model.task is '{task}'"
            )
        out = spec.load()
        if data.labels is not None and out.labels is not None and list(data.labels) != out.labels:
            raise ConfigError(
                f"data.labels does not match the labels of bundled dataset '{data.source}'; leave it unset"
            )
    else:
        out = _load_file(data, task, group_column)
    return _subsample(out, data)


def _load_file(data: DataConfig, task_name: str, group_column: Optional[str] = None) -> TaskData:
    path = Path(data.source).expanduser()
    if not path.exists():
        kind = "file does not exist" if path.suffix.lower() in (".csv", ".jsonl") else "no such file"
        raise ConfigError(
            f"data.source '{data.source}': {kind}; use a bundled dataset ({', '.join(bundled.names())}) "
            "or a .csv/.jsonl file"
        )
    task = get_task(task_name)
    columns = header_columns(path)
    rows = read_rows(path, [*task.required_columns(data, columns), *([group_column] if group_column else [])])
    labels = task.label_set(rows, data)
    examples = task.examples(rows, data, path, labels, group_column)
    if len(examples) < 2:
        raise DataError(f"{path}: {len(examples)} record(s); need at least 2 to hold one out for evaluation")
    order = np.random.default_rng(data.split_seed).permutation(len(examples))
    n_test = min(max(1, int(round(len(examples) * data.test_fraction))), len(examples) - 1)
    return TaskData(
        task=task_name,
        train=[examples[i] for i in order[n_test:]],
        test=[examples[i] for i in order[:n_test]],
        labels=labels,
        source=str(path),
    )


def _subsample(data_: TaskData, cfg: DataConfig) -> TaskData:
    if cfg.max_train_records is None and cfg.max_test_records is None:
        return data_
    # Splits are already in seeded random order: a prefix is a seeded random subset.
    return TaskData(
        task=data_.task,
        train=data_.train[: cfg.max_train_records] if cfg.max_train_records else data_.train,
        test=data_.test[: cfg.max_test_records] if cfg.max_test_records else data_.test,
        labels=data_.labels,
        source=data_.source,
    )
