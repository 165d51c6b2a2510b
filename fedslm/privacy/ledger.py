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
cap still holds) past them. The entries' checks and this composition are
:mod:`fedslm.privacy.ledger_entries`; this module is the file: its format, lock and atomic writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from fedslm.errors import BudgetExceededError
from fedslm.privacy.accountant import Step, merge, prv_fallback
from fedslm.privacy.ledger_entries import (
    MECHANISMS,
    RUNNING,
    LedgerError,
    check_entry,
    check_units,
    compose,
    compose_record,
    gaussian_steps,
    new_entry,
    running_sums,
    skellam_releases,
)

__all__ = ["DEFAULT_UNIT", "FORMAT", "MECHANISMS", "OLD_FORMAT", "RUNNING", "Ledger", "LedgerError", "UnitSpend",
           "check_entry", "compose", "locked", "write_json"]

FORMAT = "fedslm-privacy-ledger/2"
# Ledgers of fedslm before privacy units: budgets keyed by a hash of the training split.
OLD_FORMAT = "fedslm-privacy-ledger/1"
DEFAULT_UNIT = "all-records"
# Slack for float noise in ε so a plan calibrated to exactly the cap is not refused.
_EPS_SLACK = 1e-9


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
        check_units(self.path, data["units"])
        return data

    def history(self, unit: str) -> list[Step]:
        return gaussian_steps(self.entries(unit))

    def spent(self, unit: str, delta: float, accountant: str = "rdp", *, alone: bool = False) -> float:
        """ε of the unit's whole history; ``alone``: distributed-noise rounds with this node's share only."""
        return compose_record(self._record(unit), delta, accountant, alone=alone)

    def summary(self, accountant: Optional[str] = None) -> list[UnitSpend]:
        """ε per unit, composed with ``accountant``; None: the one the unit's latest round was charged with
        (the node's own choice, so the figure matches the cap it enforced)."""
        out = []
        for unit, record in sorted(self.read()["units"].items()):
            entries = record.get("entries", [])
            delta = float(entries[-1]["delta"]) if entries else 0.0
            used = accountant or (str(entries[-1].get("accountant", "rdp")) if entries else "rdp")
            shown = used
            if used == "prv" and entries and not skellam_releases(entries, False) and prv_fallback(
                    merge(gaussian_steps(entries)), delta) is not None:
                shown = "rdp (past prv's bounds)"  # what compose_record used: a looser upper bound of the same rounds
            out.append(UnitSpend(
                unit=unit,
                num_examples=int(record.get("num_examples", 0)),
                rounds=len(entries),
                steps=sum(int(e["steps"]) for e in entries),
                delta=delta,
                epsilon=compose_record(record, delta, used) if entries else 0.0,
                private=all(float(e["noise_multiplier"]) > 0 for e in entries),
                accountant=shown,
                epsilon_alone=compose_record(record, delta, used, alone=True)
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
        before = compose_record(record, delta, accountant)
        after = compose_record(record, delta, accountant, planned=planned)
        if not after <= max_epsilon + _EPS_SLACK:
            raise BudgetExceededError(self._refusal(unit, after, before, delta, max_epsilon, self.path))
        if planned.get("mechanism") == "skellam":
            alone = compose_record(record, delta, accountant, alone=True, planned=planned)
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
        return self._within_cap(unit, self._record(unit), new_entry(planned), delta=delta, max_epsilon=max_epsilon,
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
        planned = new_entry(step, skellam)
        with self._locked():
            data = self.read()
            record = data["units"].setdefault(unit, {"num_examples": num_examples, "entries": []})
            record[RUNNING] = running_sums(record)  # brought up to date once (rebuilt, for a ledger without one)
            self._within_cap(unit, record, planned, delta=delta, max_epsilon=max_epsilon,
                             accountant=accountant, max_epsilon_alone=max_epsilon_alone)
            record["num_examples"] = num_examples
            record["entries"].append({
                "id": entry_id, **planned,
                "delta": float(delta), "accountant": accountant, "run": run, "round": round,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            })
            record[RUNNING] = running_sums(record)
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


def json_text(data: Any, depth: int = 4, indent: int = 0) -> str:
    """``data`` as JSON, indented by one space a level for ``depth`` levels and on one line below them:
    a ledger's entries each on a line of their own. ``json.dump(indent=...)`` runs the pure-Python
    encoder and writes every token to the file on its own (6 ms for a ledger of 100 rounds, written
    twice a round); each compact part here goes through the C encoder in one string."""
    if depth <= 0 or not isinstance(data, (dict, list)) or not data:
        return json.dumps(data)
    pad = " " * (indent + 1)
    if isinstance(data, dict):
        items = [f"{_json_key(k)}: {json_text(v, depth - 1, indent + 1)}" for k, v in data.items()]
        opening, closing = "{", "}"
    else:
        items = [json_text(v, depth - 1, indent + 1) for v in data]
        opening, closing = "[", "]"
    return opening + "\n" + ",\n".join(pad + item for item in items) + "\n" + " " * indent + closing


def _json_key(key: Any) -> str:
    """A dict key as json.dump writes it (true, null, 1.5, Infinity as strings); other types are refused."""
    if isinstance(key, str):
        return json.dumps(key)
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(json.dumps(key))
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


def write_json(path: Path, data: Any) -> None:
    """Replace ``path`` by ``data`` atomically: a 0600 temp file, fsync, rename, fsync of the folder."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json_text(data))
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
