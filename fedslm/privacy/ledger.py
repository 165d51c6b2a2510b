"""The node's privacy ledger: one accountant per (node, privacy unit), on disk, never reset.

A *privacy unit* is a set of people's records the node declares (its node policy; default: one
unit for everything it holds). It is named by the node, never derived from the content: a new
split, subset, order, column choice or one added record is still the same people, and is charged
to the same budget. Every round of DP-SGD is appended as ``(noise_multiplier, sample_rate,
steps)`` with its run, round, δ and time, and ε is always computed by composing the unit's whole
history, across rounds, runs and restarts.

A distributed-noise round (:mod:`fedslm.privacy.distributed`) is an entry with ``mechanism: skellam``,
this node's share ``mu`` of the noise, the ``honest`` contributors it counted on and the rounding's
sensitivities: its ε is composed twice, for the sum under that assumption (the cap the node enforces
as for any round) and for the node's own noise alone (capped by its ``max_epsilon_alone``).

A round's cost is *reserved* before training starts: the cap is checked and the entry written
under one file lock (:meth:`Ledger.reserve`), so two rounds started together cannot both pass a
cap that admits one, and a crash after the reservation loses budget, never gains it. Writes are
atomic (temp file + fsync + rename). A ledger that cannot be read stops training: losing it must
never look like a fresh budget. Nor can one that holds a malformed entry (a missing field, a
non-number, NaN or ∞ where a finite σ, q, δ or step count belongs): it is refused in one line that
names the file, the unit, the entry and the field, before any ε is composed from it.

A round's check costs the same however long the ledger is. RDP composes additively per order, so
each unit keeps the running sum of its Gaussian rounds' RDP curves (``rdp_running``: the curve, the
orders and how many entries it covers); a check adds the planned round's curve to it. The sum is
derived data: when it is missing (a ledger of an earlier fedslm, a migrated one) or does not match
the entries, it is rebuilt from them, merged by (σ, q), and kept at the next reservation. PRV has no
such running form: it composes the unit's distinct (σ, q) on one grid while that stays within
:func:`fedslm.privacy.accountant.prv_fallback`'s bounds, and with RDP (a looser upper bound, so the
cap still holds) past them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from fedslm.errors import BudgetExceededError, FedslmError
from fedslm.privacy.accountant import RDP_ALPHAS, Step, epsilon, epsilon_from_rdp, merge, prv_fallback, rdp_curve

FORMAT = "fedslm-privacy-ledger/2"
# Ledgers of fedslm before privacy units: budgets keyed by a hash of the training split.
OLD_FORMAT = "fedslm-privacy-ledger/1"
DEFAULT_UNIT = "all-records"
# Slack for float noise in ε so a plan calibrated to exactly the cap is not refused.
_EPS_SLACK = 1e-9
# Per unit: the running RDP sums of its Gaussian rounds, by order set ("alphas": RDP_ALPHAS for Opacus'
# accountant; "skellam": fedslm.privacy.skellam.ORDERS, when distributed-noise rounds are composed with them).
RUNNING = "rdp_running"
MECHANISMS = ("gaussian", "skellam")


class LedgerError(FedslmError):
    """The ledger file exists but cannot be trusted; training must not proceed."""


@dataclass(frozen=True)
class UnitSpend:
    unit: str
    num_examples: int
    rounds: int
    steps: int
    delta: float
    epsilon: float
    private: bool
    accountant: str = "rdp"
    # With distributed-noise rounds: ε were no other contributor to add its share (else None).
    epsilon_alone: Optional[float] = None


def _steps(entries: list[dict[str, Any]]) -> list[Step]:
    """The Gaussian (DP-SGD) rounds of ``entries``."""
    return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in entries
            if e.get("mechanism", "gaussian") == "gaussian"]


def _releases(entries: list[dict[str, Any]], alone: bool) -> list[tuple[float, float, float, int]]:
    """The distributed-noise rounds of ``entries`` as Skellam releases (mu, l1, l2, count): the sum's
    variance under the node's assumption of ``honest`` contributors, or its own share ``alone``."""
    return [(float(e["mu"]) * (1 if alone else int(e["honest"])), float(e["l1"]), float(e["l2"]), int(e["steps"]))
            for e in entries if e.get("mechanism") == "skellam"]


def compose(entries: list[dict[str, Any]], delta: float, accountant: str = "rdp", *, alone: bool = False) -> float:
    """ε at ``delta`` of every round in ``entries``: Opacus' accountant for DP-SGD rounds alone; with
    distributed-noise (Skellam) rounds among them, everything in RDP at integer orders (sound for
    both, a little looser than PRV for the Gaussian part). ``alone``: each distributed round counted
    with this node's own noise only."""
    return _compose({"entries": entries}, delta, accountant, alone=alone)


def _orders(key: str) -> list:
    if key == "alphas":
        return list(RDP_ALPHAS)
    from fedslm.privacy import skellam

    return list(skellam.ORDERS)


def _digest(entries: list[dict[str, Any]]) -> str:
    """A digest of the Gaussian rounds a running sum covers: an entry edited or removed by hand after the
    sum was written no longer matches, and the sum is rebuilt from the entries (hashing is microseconds an
    entry, far below one accountant evaluation)."""
    return hashlib.sha256(json.dumps(_steps(entries)).encode()).hexdigest()


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
    for sigma, q, steps in merge(_steps(entries[start:])):
        curve = curve + rdp_curve(sigma, q, steps, orders)
    return curve


def _running(record: dict[str, Any]) -> dict[str, Any]:
    """The running sums covering every entry of ``record`` (Skellam orders only where needed)."""
    entries = record.get("entries", [])
    keys = ["alphas"] + (["skellam"] if any(e.get("mechanism") == "skellam" for e in entries) else [])
    return {key: {"orders": _orders(key), "curve": _gaussian_curve(record, key).tolist(), "entries": len(entries),
                  "digest": _digest(entries)} for key in keys}


def _compose(record: dict[str, Any], delta: float, accountant: str, *, alone: bool = False,
             planned: Optional[dict[str, Any]] = None) -> float:
    """ε at ``delta`` of a unit's ``record`` (and a ``planned`` round on top), at a cost that does not grow
    with the number of its RDP rounds (see the module docstring)."""
    entries = record.get("entries", [])
    extra = [planned] if planned is not None else []
    releases = _releases([*entries, *extra], alone)
    if not releases and accountant == "prv":
        history = merge(_steps([*entries, *extra]))
        if prv_fallback(history, delta) is None:
            return epsilon(history, delta, "prv")
    key = "skellam" if releases else "alphas"
    orders = _orders(key)
    curve = _gaussian_curve(record, key)
    for sigma, q, steps in _steps(extra):
        curve = curve + rdp_curve(sigma, q, steps, orders)
    if not releases:
        if not any(n > 0 and q > 0 for _, q, n in _steps([*entries, *extra])):
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


def _check_units(path: Path, units: dict[str, Any]) -> None:
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


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    # -- reading -------------------------------------------------------------
    def read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"format": FORMAT, "units": {}}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0]
            raise LedgerError(
                f"privacy ledger {self.path} is unreadable ({reason}); refusing to train, since a lost ledger "
                "must not reset the spent budget. Restore it from backup."
            ) from None
        if isinstance(data, dict) and data.get("format") == OLD_FORMAT:
            raise LedgerError(
                f"privacy ledger {self.path} was written by an earlier fedslm that kept one budget per content hash; "
                f"refusing to train until its spend is charged to a privacy unit: fedslm ledger migrate {self.path} "
                f"--unit {DEFAULT_UNIT} (or the unit named in your node policy)")
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("units"), dict):
            raise LedgerError(f"privacy ledger {self.path} is not a {FORMAT} file; refusing to train")
        _check_units(self.path, data["units"])
        return data

    def history(self, unit: str) -> list[Step]:
        return _steps(self.entries(unit))

    def spent(self, unit: str, delta: float, accountant: str = "rdp", *, alone: bool = False) -> float:
        """ε of the unit's whole history; ``alone``: distributed-noise rounds with this node's share only."""
        return _compose(self._record(unit), delta, accountant, alone=alone)

    def summary(self, accountant: Optional[str] = None) -> list[UnitSpend]:
        """ε per unit, composed with ``accountant``; None: the one the unit's latest round was charged with
        (the node's own choice, so the figure matches the cap it enforced)."""
        out = []
        for unit, record in sorted(self.read()["units"].items()):
            entries = record.get("entries", [])
            delta = float(entries[-1]["delta"]) if entries else 0.0
            used = accountant or (str(entries[-1].get("accountant", "rdp")) if entries else "rdp")
            shown = used
            if used == "prv" and entries and not _releases(entries, False) and prv_fallback(
                    merge(_steps(entries)), delta) is not None:
                shown = "rdp (past prv's bounds)"  # what _compose used: a looser upper bound of the same rounds
            out.append(UnitSpend(
                unit=unit,
                num_examples=int(record.get("num_examples", 0)),
                rounds=len(entries),
                steps=sum(int(e["steps"]) for e in entries),
                delta=delta,
                epsilon=_compose(record, delta, used) if entries else 0.0,
                private=all(float(e["noise_multiplier"]) > 0 for e in entries),
                accountant=shown,
                epsilon_alone=_compose(record, delta, used, alone=True)
                if any(e.get("mechanism") == "skellam" for e in entries) else None,
            ))
        return out

    def entries(self, unit: str) -> list[dict[str, Any]]:
        return list(self._record(unit).get("entries", []))

    def _record(self, unit: str) -> dict[str, Any]:
        return self.read()["units"].get(unit, {})

    # -- enforcing and writing ---------------------------------------------
    @staticmethod
    def _refusal(unit: str, after: float, before: float, delta: float, max_epsilon: float, path: Path) -> str:
        shown = "∞ (no noise)" if math.isinf(after) else f"{after:.3f}"
        return (f"privacy budget: this round would take privacy unit {unit!r} to ε={shown} at δ={delta:.3g}, past this "
                f"node's cap max_epsilon={max_epsilon:g} (spent so far ε={before:.3f}, ledger {path}); refusing to train")

    def _within_cap(self, unit: str, record: dict[str, Any], planned: dict[str, Any], *, delta: float,
                    max_epsilon: float, accountant: str, max_epsilon_alone: float = math.inf) -> tuple[float, float]:
        check_entry({**planned, "delta": delta}, f"the planned round of privacy unit {unit!r} (ledger {self.path})")
        before = _compose(record, delta, accountant)
        after = _compose(record, delta, accountant, planned=planned)
        if not after <= max_epsilon + _EPS_SLACK:
            raise BudgetExceededError(self._refusal(unit, after, before, delta, max_epsilon, self.path))
        if planned.get("mechanism") == "skellam":
            alone = _compose(record, delta, accountant, alone=True, planned=planned)
            if not alone <= max_epsilon_alone + _EPS_SLACK:
                raise BudgetExceededError(
                    f"privacy budget: this distributed-noise round would take privacy unit {unit!r} to ε={alone:.3f} "
                    f"at δ={delta:.3g} counting this node's own noise alone, past this node's cap "
                    f"max_epsilon_alone={max_epsilon_alone:g} (ledger {self.path}); refusing to train")
        return before, after

    def check(
        self, unit: str, planned: Step, *, delta: float, max_epsilon: float, accountant: str = "rdp"
    ) -> tuple[float, float]:
        """(ε spent, ε after ``planned``); refuse if the latter passes ``max_epsilon``. Writes nothing:
        use :meth:`reserve` to spend."""
        return self._within_cap(unit, self._record(unit), _entry(planned), delta=delta, max_epsilon=max_epsilon,
                                accountant=accountant)

    def reserve(
        self, unit: str, step: Step, *, delta: float, max_epsilon: float, num_examples: int,
        run: str = "", round: Optional[int] = None, accountant: str = "rdp",
        skellam: Optional[dict[str, float]] = None, max_epsilon_alone: float = math.inf,
    ) -> str:
        """Check the cap and write the round's entry under one lock, before any training; returns the
        entry's id (for :meth:`settle`). Refuses, writing nothing, if the round would pass ``max_epsilon``.

        ``skellam``: a distributed-noise round (``mu`` this node's variance, ``honest``, ``l1``, ``l2``;
        ``step`` then only shows the sum's noise in Gaussian terms): ``max_epsilon`` caps the ε of the
        sum under the node's assumption, ``max_epsilon_alone`` the ε of its own noise alone."""
        entry_id = uuid.uuid4().hex
        planned = _entry(step, skellam)
        with self._locked():
            data = self.read()
            record = data["units"].setdefault(unit, {"num_examples": num_examples, "entries": []})
            record[RUNNING] = _running(record)  # brought up to date once (rebuilt, for a ledger without one)
            self._within_cap(unit, record, planned, delta=delta, max_epsilon=max_epsilon,
                             accountant=accountant, max_epsilon_alone=max_epsilon_alone)
            record["num_examples"] = num_examples
            record["entries"].append({
                "id": entry_id, **planned,
                "delta": float(delta), "accountant": accountant, "run": run, "round": round,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            })
            record[RUNNING] = _running(record)
            self._write(data)
        return entry_id

    def settle(self, unit: str, entry_id: str, release: dict[str, Any]) -> None:
        """Record which update a reserved round paid for (see :mod:`fedslm.node.releases`)."""
        with self._locked():
            data = self.read()
            for entry in data["units"].get(unit, {}).get("entries", []):
                if entry.get("id") == entry_id:
                    entry["release"] = release
                    self._write(data)
                    return
        raise LedgerError(f"privacy ledger {self.path} holds no reserved entry {entry_id} for unit {unit!r}")

    def charge(
        self, unit: str, step: Step, *, delta: float, num_examples: int,
        run: str = "", round: Optional[int] = None, accountant: str = "rdp",
    ) -> float:
        """Append one round's steps with no cap (ε may become ∞) and return ε spent after it."""
        self.reserve(unit, step, delta=delta, max_epsilon=math.inf, num_examples=num_examples, run=run,
                     round=round, accountant=accountant)
        return self.spent(unit, delta, accountant)

    def migrate(self, unit: str) -> int:
        """Charge every entry of an old (content-hash keyed) ledger to ``unit``: they were spent on the
        node's records, so all of them count against its budget. Returns how many entries moved."""
        with self._locked():
            try:
                old = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise LedgerError(f"privacy ledger {self.path} is unreadable ({exc})") from None
            if not isinstance(old, dict) or old.get("format") != OLD_FORMAT or not isinstance(old.get("datasets"), dict):
                raise LedgerError(f"privacy ledger {self.path} is not a {OLD_FORMAT} file; nothing to migrate")
            entries = [e for d in old["datasets"].values() for e in d.get("entries", [])]
            entries.sort(key=lambda e: str(e.get("time", "")))
            size = max((int(d.get("num_examples", 0)) for d in old["datasets"].values()), default=0)
            self._write({"format": FORMAT, "units": {unit: {"num_examples": size, "entries": entries}},
                         "migrated_from": OLD_FORMAT})
        return len(entries)

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return locked(self.path)

    def _write(self, data: dict[str, Any]) -> None:
        write_json(self.path, data)


def _entry(step: Step, skellam: Optional[dict[str, float]] = None) -> dict[str, Any]:
    sigma, q, steps = step
    entry: dict[str, Any] = {"noise_multiplier": float(sigma), "sample_rate": float(q), "steps": int(steps)}
    if skellam is not None:
        entry.update({"mechanism": "skellam", "mu": float(skellam["mu"]), "honest": int(skellam["honest"]),
                      "l1": float(skellam["l1"]), "l2": float(skellam["l2"])})
    return entry


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``<path>.lock`` (beside the file, which is then replaced, never edited)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_json(path: Path, data: Any) -> None:
    """Replace ``path`` by ``data`` atomically: a 0600 temp file, fsync, rename, fsync of the folder."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
