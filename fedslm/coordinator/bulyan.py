"""Bulyan (El Mhamdi et al., 2018) as the paper has it, on Flower's ``Bulyan`` strategy.

Two changes to Flower 1.42's ``Bulyan``:

* selection: Flower takes the θ = n - 2f updates with the lowest Krum scores computed once over all n
  updates; the paper applies Krum θ times, each time to the updates not yet selected, so that an
  update's score is never computed against updates Krum already took out (:func:`recursive_krum`);
* Flower reads each selected update with ``to_numpy_ndarrays(keep_input=False)``, which runs a full
  ``gc.collect()`` per update: about a second each in a coordinator process that holds a model.

The rest is Flower's: the coordinate-wise mean of the β = θ - 2f selected values closest to their
median (``aggregate_n_closest_weights``).
"""

from __future__ import annotations

import logging
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Bulyan as FlowerBulyan
from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights

log = logging.getLogger("fedslm.server")


def flat_updates(contents: list[RecordDict]) -> np.ndarray:
    """Each reply's arrays as one float64 row (replies carry exactly one ArrayRecord, screened)."""
    key = next(iter(contents[0].array_records.keys()))
    rows = []
    for content in contents:
        record: ArrayRecord = content[key]  # type: ignore[assignment]
        rows.append(np.concatenate([a.numpy().astype(np.float64).ravel() for a in record.values()]))
    return np.stack(rows)


def krum_scores(flat: np.ndarray, f: int) -> np.ndarray:
    """Krum's score of each row: the sum of squared distances to its n - f - 2 nearest other rows.

    Distances are computed as ||x - y||² directly (not ||x||² + ||y||² - 2x·y, which cancels
    catastrophically when the rows are close to each other and far from 0)."""
    n = len(flat)
    closest = max(1, n - f - 2)
    scores = np.empty(n)
    for i in range(n):
        d = ((flat - flat[i]) ** 2).sum(axis=1)
        others = np.delete(d, i)
        scores[i] = np.sort(others)[:closest].sum()
    return scores


def recursive_krum(contents: list[RecordDict], num_malicious_nodes: int, theta: int) -> list[RecordDict]:
    """Flower's ``selection_rule`` signature: the θ replies Krum picks one by one."""
    flat = flat_updates(contents)
    remaining = list(range(len(contents)))
    chosen: list[int] = []
    while len(chosen) < theta and remaining:
        scores = krum_scores(flat[remaining], num_malicious_nodes)
        best = remaining[int(np.argmin(scores))]
        chosen.append(best)
        remaining.remove(best)
    return [contents[i] for i in chosen]


class Bulyan(FlowerBulyan):
    """Flower's Bulyan with the paper's recursive Krum selection, reading updates without a gc per update."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("selection_rule", recursive_krum)
        super().__init__(*args, **kwargs)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        f = self.num_malicious_nodes
        if len(valid) < 4 * f + 3:
            log.warning("round %s: bulyan needs at least 4f + 3 = %d updates, got %d; nothing aggregated",
                        server_round, 4 * f + 3, len(valid))
            return None, None
        theta = len(valid) - 2 * f
        beta = theta - 2 * f
        selected = self.selection_rule([m.content for m in valid], f, theta)
        key = next(iter(selected[0].array_records.keys()))
        names = list(selected[0][key].keys())
        arrays = [[selected_record[key][name].numpy() for name in names] for selected_record in selected]
        medians = [np.median(np.stack(layer), axis=0) for layer in zip(*arrays)]
        out = aggregate_n_closest_weights(medians, arrays, beta)
        record = ArrayRecord({name: Array(np.asarray(a)) for name, a in zip(names, out)})
        return record, self.train_metrics_aggr_fn(selected, self.weighted_by_key)
