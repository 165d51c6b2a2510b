"""What the coordinator believes of a reply's metrics: nothing it has not screened.

A reply's MetricRecord is written by the institution, so every value in it is a claim. Before a
reply may join a round, :func:`screen` checks its records and every metric against the contract
(:data:`TRAIN` and :data:`EVALUATE`: a known key set, each with a type and a range); an unknown key,
a wrong type, a value out of range or an extra record drops *that reply* (the caller logs it with
the node id), never the run.

Three things the coordinator decides itself, never from a reply:

* **weights** (:func:`weights`): a claimed record count is screened (a finite whole number >= 1)
  and then clamped to ``federation.max_weight_ratio`` times the round's lower median claim and to
  ``federation.max_weight``; under client-level DP, robust strategies or ``federation.weighting=equal``
  every reply weighs 1. The lower median of n claims is an honest institution's claim while fewer
  than half of them lie, so one member's share of a weighted average is at most r / (r + n - 1)
  (a deployed node that keeps its size private sends 1: among such nodes a public size counts as
  at most r; with half or more of the members lying only ``federation.max_weight`` bounds them);
* **identity**: the node id the SuperLink authenticated (``RunRecorder.node_of``), never the
  reply's ``institution`` metric, which is only a display label (:class:`Labels`);
* **what Flower aggregates**: :func:`canonical` rewrites a screened reply to its arrays, a
  MetricRecord holding only the coordinator's weight (so every reply has the same keys, which
  Flower's strategies require), and the screened metrics under :data:`SCREENED` for the code that
  needs them after screening (client-level DP's clipped bits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from fedslm.wire import codec
from fedslm.wire.secagg import CLIPPED_COUNT

# The metric key the coordinator writes its own weight under (a reply's own value is never read).
WEIGHT = "fedslm-weight"
# The record a screened reply carries its screened metrics in (a ConfigRecord: Flower's strategies
# aggregate only MetricRecords, so this one rides along untouched).
SCREENED = "fedslm-screened"
# Counts are whole numbers below this (a float cannot hold larger ones exactly).
MAX_COUNT = 2**53
# Institution labels shown on the board: small non-negative integers.
MAX_LABEL = 2**31


@dataclass(frozen=True)
class Spec:
    """One metric of the contract.

    kind: ``count`` (a whole number), ``number``, ``label`` (a whole number in [0, MAX_LABEL)),
    ``flag`` (0 or 1) or ``one`` (exactly 1). ``withheld``: the node may send codec.WITHHELD instead.
    ``nonfinite``: NaN / +inf are honest values here (shown as none; never used to weigh).
    """

    kind: str
    lo: float = 0.0
    hi: float = math.inf
    withheld: bool = False
    nonfinite: bool = False


_COUNT = Spec("count", 0, MAX_COUNT - 1)
_RECORDS = Spec("count", 1, MAX_COUNT - 1)  # a record count: at least 1 (a node that withholds it sends 1)
_SECONDS = Spec("number", withheld=True)
_PROB = Spec("number", 0.0, 1.0, withheld=True)

TRAIN: dict[str, Spec] = {
    "num-examples": _RECORDS,
    codec.UNIT_WEIGHT: Spec("one"),
    "institution": Spec("label", 0, MAX_LABEL - 1),
    # NaN when the node's Poisson sampling drew no record all round (an honest outcome).
    "train-loss": Spec("number", withheld=True, nonfinite=True),
    # +inf for a round without DP.
    "epsilon": Spec("number", withheld=True, nonfinite=True),
    "epsilon-alone": Spec("number", withheld=True, nonfinite=True),
    "delta": _PROB,
    "noise-multiplier": Spec("number", withheld=True),
    "sample-rate": _PROB,
    "steps": _COUNT,
    "empty-steps": Spec("count", 0, MAX_COUNT - 1, withheld=True),
    "bytes-up": _COUNT,
    "bytes-down": _COUNT,
    "train-seconds": _SECONDS,
    "seconds": _SECONDS,
    "private": Spec("flag"),
    "replayed": Spec("flag"),
    # Client-side clipping (client-level DP) and SecAgg+.
    KEY_NORM_BIT: Spec("flag", withheld=True),
    "update-norm": Spec("number", withheld=True),
    "secagg-clipped": Spec("count", 0, MAX_COUNT - 1, withheld=True),
    "secagg-weight": Spec("number"),
}
# Written by the coordinator's own SecAgg+ driver into the replies it rebuilds: accepted only there.
SECAGG_TRAIN: dict[str, Spec] = {**TRAIN, CLIPPED_COUNT: _COUNT}

EVALUATE: dict[str, Spec] = {
    "num-examples": _RECORDS,
    codec.UNIT_WEIGHT: Spec("one"),
    "institution": Spec("label", 0, MAX_LABEL - 1),
    "loss": Spec("number", withheld=True),
    "accuracy": _PROB,
    "macro-f1": _PROB,
    "perplexity": Spec("number", withheld=True),
    "tokens": _COUNT,
    "seconds": _SECONDS,
}
REQUIRED = ("num-examples",)


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def check_value(key: str, value: Any, spec: Spec) -> Optional[str]:
    """None if ``value`` fits ``spec``, else why not."""
    x = _number(value)
    if x is None:
        return f"metric {key!r} is {type(value).__name__}, not a number"
    if spec.withheld and x == codec.WITHHELD:
        return None
    if math.isnan(x) or math.isinf(x):
        if spec.nonfinite and (math.isnan(x) or x > 0):
            return None
        return f"metric {key!r} is {x}, not a finite number"
    if spec.kind == "one":
        return None if x == 1.0 else f"metric {key!r} must be 1, got {x:g}"
    if spec.kind == "flag":
        return None if x in (0.0, 1.0) else f"metric {key!r} must be 0 or 1, got {x:g}"
    if spec.kind in ("count", "label") and x != math.floor(x):
        return f"metric {key!r} must be a whole number, got {x:g}"
    if not spec.lo <= x <= spec.hi:
        return f"metric {key!r} must be in [{spec.lo:g}, {spec.hi:g}], got {x:g}"
    return None


def screen(msg: Message, phase: str, *, secure: bool = False) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """(the reply's screened metrics, None), or (None, the reason to drop it).

    ``phase``: "train" or "evaluate"; ``secure``: the reply was rebuilt by the coordinator's SecAgg+
    driver (which adds the clipped count it unmasked).
    """
    expected = ({codec.ARRAYS, codec.METRICS} if phase == "train" else {codec.METRICS})
    names = set(msg.content.keys())
    if names - expected:
        return None, f"unexpected record(s) {sorted(names - expected)[:3]}"
    if phase == "train" and not isinstance(msg.content.get(codec.ARRAYS), ArrayRecord):
        return None, "no adapter (ArrayRecord 'arrays')"
    record = msg.content.get(codec.METRICS)
    if not isinstance(record, MetricRecord):
        return None, "no metrics (MetricRecord 'metrics')"
    contract = (SECAGG_TRAIN if secure else TRAIN) if phase == "train" else EVALUATE
    unknown = sorted(set(record) - set(contract))
    if unknown:
        return None, f"unknown metric(s) {unknown[:3]}"
    for key in REQUIRED:
        if key not in record:
            return None, f"metric {key!r} is missing"
    clean: dict[str, Any] = {}
    for key, value in record.items():
        reason = check_value(key, value, contract[key])
        if reason is not None:
            return None, reason
        clean[key] = value
    return clean, None


def lower_median(values: Sequence[float]) -> float:
    """The ⌈n/2⌉-th smallest value: an honest one while fewer than half of the values lie upwards."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def weights(claims: Sequence[float], *, equal: bool, max_ratio: float, max_weight: Optional[float]) -> list[float]:
    """The coordinator's weight for each of a round's screened replies, from their claimed record counts.

    ``equal``: every reply weighs 1 (client-level DP, robust strategies, federation.weighting=equal).
    Else each claim (already screened: a whole number >= 1) is clamped to ``max_ratio`` times the lower
    median claim and to ``max_weight``.
    """
    if equal or not claims:
        return [1.0] * len(claims)
    cap = max_ratio * lower_median(claims)
    if max_weight is not None:
        cap = min(cap, max_weight)
    return [float(min(c, cap)) for c in claims]


def canonical(msg: Message, clean: Mapping[str, Any], weight: float) -> None:
    """Rewrite a screened reply in place to what Flower's strategies may read (see the module doc)."""
    content = RecordDict()
    if codec.ARRAYS in msg.content:
        content[codec.ARRAYS] = msg.content[codec.ARRAYS]
    content[codec.METRICS] = MetricRecord({WEIGHT: float(weight)})
    content[SCREENED] = ConfigRecord({k: v for k, v in clean.items()})
    msg.content = content


def screened(msg: Message) -> dict[str, Any]:
    """A screened reply's metrics (empty for a reply that was never screened)."""
    record = msg.content.get(SCREENED) if SCREENED in msg.content else None
    return dict(record) if record is not None else {}


class Labels:
    """Institution labels for the board, one per authenticated node and run.

    A node's first valid claim becomes its label unless another node holds it (or two nodes claim
    it in the same round: neither gets it); a node keeps its label for the run whatever it claims
    later. A node without one gets a negative label of its own, so no reply can take over or
    overwrite another node's entry (entries are keyed by node id; the label is only shown).
    """

    def __init__(self) -> None:
        self.of: dict[int, int] = {}
        self.owner: dict[int, int] = {}

    def assign(self, claims: Mapping[int, Any]) -> dict[int, int]:
        """Labels for ``claims`` (node id -> claimed institution, None if none), in node-id order."""
        fresh = {n: c for n, c in claims.items() if n not in self.of}
        wanted: dict[int, list[int]] = {}
        for node, claim in fresh.items():
            if claim is not None and check_value("institution", claim, TRAIN["institution"]) is None:
                wanted.setdefault(int(claim), []).append(node)
        for label, nodes in wanted.items():
            if len(nodes) == 1 and label not in self.owner:
                self._give(nodes[0], label)
        for node in sorted(fresh):
            if node not in self.of:
                self._give(node, -1 - sum(1 for v in self.of.values() if v < 0))
        return {n: self.of[n] for n in claims}

    def _give(self, node: int, label: int) -> None:
        self.of[node] = label
        self.owner[label] = node
