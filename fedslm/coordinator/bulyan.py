"""Bulyan's selection step as the paper has it (El Mhamdi et al., 2018): Krum applied recursively.

Flower 1.42's ``Bulyan`` selects the θ = n - 2f updates with the lowest Krum scores computed once
over all n updates; the paper applies Krum θ times, each time to the updates not yet selected, so
that an update's score is never computed against updates Krum already took out. fedslm passes
:func:`recursive_krum` as Flower's ``selection_rule`` and keeps Flower's coordinate-wise trimming.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, RecordDict


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
