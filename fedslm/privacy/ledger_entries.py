"""A privacy ledger's entries: what a round's entry must hold, and the ε a unit's entries compose to.

Pure functions over the JSON records of :mod:`fedslm.privacy.ledger` (no file, no lock): the checks
that refuse an entry no round of this code could have written, and the composition of a unit's
rounds, Gaussian (DP-SGD) and distributed-noise (Skellam), at a cost that does not grow with their
number: RDP composes additively per order, so a unit keeps the running sum of its Gaussian rounds'
RDP curves (``rdp_running``), with a digest of the rounds it covers; a sum that is missing or no
longer matches the entries is rebuilt from them, merged by (σ, q).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from fedslm.errors import FedslmError
from fedslm.privacy.accountant import RDP_ALPHAS, Step, epsilon, epsilon_from_rdp, merge, prv_fallback, rdp_curve

# Per unit: the running RDP sums of its Gaussian rounds, by order set ("alphas": RDP_ALPHAS for Opacus'
# accountant; "skellam": fedslm.privacy.skellam.ORDERS, when distributed-noise rounds are composed with them).
RUNNING = "rdp_running"
MECHANISMS = ("gaussian", "skellam")


class LedgerError(FedslmError):
    """The ledger file exists but cannot be trusted; training must not proceed."""


def gaussian_steps(entries: list[dict[str, Any]]) -> list[Step]:
    """The Gaussian (DP-SGD) rounds of ``entries``."""
    return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in entries
            if e.get("mechanism", "gaussian") == "gaussian"]


def skellam_releases(entries: list[dict[str, Any]], alone: bool) -> list[tuple[float, float, float, int]]:
    """The distributed-noise rounds of ``entries`` as Skellam releases (mu, l1, l2, count): the sum's
    variance under the node's assumption of ``honest`` contributors, or its own share ``alone``."""
    return [(float(e["mu"]) * (1 if alone else int(e["honest"])), float(e["l1"]), float(e["l2"]), int(e["steps"]))
            for e in entries if e.get("mechanism") == "skellam"]


def compose(entries: list[dict[str, Any]], delta: float, accountant: str = "rdp", *, alone: bool = False) -> float:
    """ε at ``delta`` of every round in ``entries``: Opacus' accountant for DP-SGD rounds alone; with
    distributed-noise (Skellam) rounds among them, everything in RDP at integer orders (sound for
    both, a little looser than PRV for the Gaussian part). ``alone``: each distributed round counted
    with this node's own noise only."""
    return compose_record({"entries": entries}, delta, accountant, alone=alone)


def _orders(key: str) -> list:
    if key == "alphas":
        return list(RDP_ALPHAS)
    from fedslm.privacy import skellam

    return list(skellam.ORDERS)


def _digest(entries: list[dict[str, Any]]) -> str:
    """A digest of the Gaussian rounds a running sum covers: an entry edited or removed by hand after the
    sum was written no longer matches, and the sum is rebuilt from the entries (hashing is microseconds an
    entry, far below one accountant evaluation)."""
    return hashlib.sha256(json.dumps(gaussian_steps(entries)).encode()).hexdigest()


def _usable(state: Any, orders: list, entries: list[dict[str, Any]]) -> bool:
    """Whether a stored running sum is one this code wrote for these orders and (a prefix of) these entries."""
    if not isinstance(state, dict) or state.get("orders") != orders:
        return False
    covered, curve = state.get("entries"), state.get("curve")
    return (isinstance(covered, int) and not isinstance(covered, bool) and 0 <= covered <= len(entries)
            and isinstance(curve, list) and len(curve) == len(orders)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in curve)
            and state.get("digest") == _digest(entries[:covered]))


def _gaussian_curve(record: dict[str, Any], key: str) -> np.ndarray:
    """The RDP curve at ``key``'s orders of every Gaussian round of a unit's ``record``: its running sum,
    plus the rounds past it (all of them, merged by (σ, q), when there is no usable sum)."""
    orders, entries = _orders(key), record.get("entries", [])
    state = (record.get(RUNNING) or {}).get(key) if isinstance(record.get(RUNNING), dict) else None
    curve, start = np.zeros(len(orders)), 0
    if _usable(state, orders, entries):
        curve, start = np.asarray(state["curve"], dtype=float), int(state["entries"])
    for sigma, q, steps in merge(gaussian_steps(entries[start:])):
        curve = curve + rdp_curve(sigma, q, steps, orders)
    return curve


def running_sums(record: dict[str, Any]) -> dict[str, Any]:
    """The running sums covering every entry of ``record`` (Skellam orders only where needed)."""
    entries = record.get("entries", [])
    keys = ["alphas"] + (["skellam"] if any(e.get("mechanism") == "skellam" for e in entries) else [])
    return {key: {"orders": _orders(key), "curve": _gaussian_curve(record, key).tolist(), "entries": len(entries),
                  "digest": _digest(entries)} for key in keys}


def compose_record(record: dict[str, Any], delta: float, accountant: str, *, alone: bool = False,
                   planned: Optional[dict[str, Any]] = None) -> float:
    """ε at ``delta`` of a unit's ``record`` (and a ``planned`` round on top), at a cost that does not grow
    with the number of its RDP rounds (see the module docstring)."""
    entries = record.get("entries", [])
    extra = [planned] if planned is not None else []
    releases = skellam_releases([*entries, *extra], alone)
    if not releases and accountant == "prv":
        history = merge(gaussian_steps([*entries, *extra]))
        if prv_fallback(history, delta) is None:
            return epsilon(history, delta, "prv")
    key = "skellam" if releases else "alphas"
    orders = _orders(key)
    curve = _gaussian_curve(record, key)
    for sigma, q, steps in gaussian_steps(extra):
        curve = curve + rdp_curve(sigma, q, steps, orders)
    if not releases:
        if not any(n > 0 and q > 0 for _, q, n in gaussian_steps([*entries, *extra])):
            return 0.0
        return epsilon_from_rdp(curve, delta, orders)
    from fedslm.privacy import skellam

    return skellam.epsilon(releases, delta, extra_rdp=curve)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# (field, test, what it must be) of every entry; Skellam rounds also carry mu, honest, l1, l2.
_FIELDS = (
    ("noise_multiplier", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    ("sample_rate", lambda v: _number(v) and 0 <= v <= 1, "a finite number in [0, 1]"),
    ("steps", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("delta", lambda v: _number(v) and 0 < v < 1, "a finite number in (0, 1)"),
)
_SKELLAM_FIELDS = (
    ("mu", lambda v: _number(v) and v > 0, "a finite number > 0"),
    ("honest", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("l1", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    ("l2", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_entry(entry: Any, where: str) -> None:
    """Refuse an entry that is no round this code could have written, naming ``where`` and the field."""
    if not isinstance(entry, dict):
        raise LedgerError(f"{where} is not a mapping but {_shown(entry)}; refusing to train (restore the ledger "
                          "from backup)")
    mechanism = entry.get("mechanism", "gaussian")
    if mechanism not in MECHANISMS:
        raise LedgerError(f"{where}: field 'mechanism' is {_shown(mechanism)}, not one of {', '.join(MECHANISMS)}; "
                          "refusing to train (restore the ledger from backup)")
    for name, ok, what in _FIELDS + (_SKELLAM_FIELDS if mechanism == "skellam" else ()):
        if name not in entry:
            raise LedgerError(f"{where}: field {name!r} is missing; refusing to train (restore the ledger from backup)")
        if not ok(entry[name]):
            raise LedgerError(f"{where}: field {name!r} is {_shown(entry[name])}, not {what}; refusing to train "
                              "(restore the ledger from backup)")
    if entry.get("accountant", "rdp") not in ("rdp", "prv"):
        raise LedgerError(f"{where}: field 'accountant' is {_shown(entry.get('accountant'))}, not rdp or prv; "
                          "refusing to train (restore the ledger from backup)")


def check_units(path: Path, units: dict[str, Any]) -> None:
    for unit, record in units.items():
        where = f"privacy ledger {path}: unit {unit!r}"
        if not isinstance(record, dict) or not isinstance(record.get("entries", []), list):
            raise LedgerError(f"{where} is not a mapping with a list of entries; refusing to train (restore the "
                              "ledger from backup)")
        if not _integer(record.get("num_examples", 0)):
            raise LedgerError(f"{where}: field 'num_examples' is {_shown(record.get('num_examples'))}, not an "
                              "integer; refusing to train (restore the ledger from backup)")
        for i, entry in enumerate(record.get("entries", [])):
            check_entry(entry, f"{where}, entry {i}")


def new_entry(step: Step, skellam: Optional[dict[str, float]] = None) -> dict[str, Any]:
    sigma, q, steps = step
    entry: dict[str, Any] = {"noise_multiplier": float(sigma), "sample_rate": float(q), "steps": int(steps)}
    if skellam is not None:
        entry.update({"mechanism": "skellam", "mu": float(skellam["mu"]), "honest": int(skellam["honest"]),
                      "l1": float(skellam["l1"]), "l2": float(skellam["l2"])})
    return entry
