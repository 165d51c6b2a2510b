"""The node's privacy ledger: one accountant per (node, dataset), on disk, never reset.

Every round of DP-SGD a node runs on a dataset is appended as
``(noise_multiplier, sample_rate, steps)`` — with its run, round, δ and time —
and ε is always computed by composing the whole history, across rounds, runs
and restarts. Writes are atomic (temp file + fsync + rename) under a file
lock; a round is charged before its update leaves the node. A ledger that
cannot be read stops training: losing it must never look like a fresh budget.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from fedslm.errors import BudgetExceededError, FedslmError
from fedslm.privacy.accountant import Step, epsilon

FORMAT = "fedslm-privacy-ledger/1"
# Slack for float noise in ε so a plan calibrated to exactly the cap is not refused.
_EPS_SLACK = 1e-9


class LedgerError(FedslmError):
    """The ledger file exists but cannot be trusted; training must not proceed."""


@dataclass(frozen=True)
class DatasetSpend:
    dataset_id: str
    num_examples: int
    rounds: int
    steps: int
    delta: float
    epsilon: float
    private: bool


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    # -- reading -------------------------------------------------------------
    def read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"format": FORMAT, "datasets": {}}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LedgerError(
                f"privacy ledger {self.path} is unreadable ({exc}); refusing to train, since a lost ledger "
                "must not reset the spent budget. Restore it from backup."
            ) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("datasets"), dict):
            raise LedgerError(f"privacy ledger {self.path} is not a {FORMAT} file; refusing to train")
        return data

    def history(self, dataset_id: str) -> list[Step]:
        entries = self.read()["datasets"].get(dataset_id, {}).get("entries", [])
        return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in entries]

    def spent(self, dataset_id: str, delta: float, accountant: str = "rdp") -> float:
        return epsilon(self.history(dataset_id), delta, accountant)

    def summary(self, accountant: str = "rdp") -> list[DatasetSpend]:
        out = []
        for dataset_id, record in sorted(self.read()["datasets"].items()):
            entries = record.get("entries", [])
            delta = float(entries[-1]["delta"]) if entries else 0.0
            hist = [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in entries]
            out.append(DatasetSpend(
                dataset_id=dataset_id,
                num_examples=int(record.get("num_examples", 0)),
                rounds=len(entries),
                steps=sum(int(e["steps"]) for e in entries),
                delta=delta,
                epsilon=epsilon(hist, delta, accountant) if entries else 0.0,
                private=all(float(e["noise_multiplier"]) > 0 for e in entries),
            ))
        return out

    def entries(self, dataset_id: str) -> list[dict[str, Any]]:
        return list(self.read()["datasets"].get(dataset_id, {}).get("entries", []))

    # -- enforcing -----------------------------------------------------------
    def check(
        self, dataset_id: str, planned: Step, *, delta: float, max_epsilon: float, accountant: str = "rdp"
    ) -> tuple[float, float]:
        """(ε spent, ε after ``planned``); refuse if the latter passes ``max_epsilon``."""
        history = self.history(dataset_id)
        before = epsilon(history, delta, accountant)
        after = epsilon([*history, planned], delta, accountant)
        if not after <= max_epsilon + _EPS_SLACK:
            shown = "∞ (no noise)" if math.isinf(after) else f"{after:.3f}"
            raise BudgetExceededError(
                f"privacy budget: this round would take dataset {dataset_id} to ε={shown} at δ={delta:.3g}, "
                f"past this node's privacy.max_epsilon={max_epsilon:g} (spent so far ε={before:.3f}, "
                f"ledger {self.path}); refusing to train"
            )
        return before, after

    # -- writing -------------------------------------------------------------
    def charge(
        self, dataset_id: str, step: Step, *, delta: float, num_examples: int,
        run: str = "", round: Optional[int] = None, accountant: str = "rdp",
        release: Optional[dict[str, Any]] = None,
    ) -> float:
        """Append one round's steps (atomically, durably) and return ε spent after it.

        ``release`` names the update this charge paid for (see :mod:`fedslm.privacy.releases`).
        """
        sigma, q, steps = step
        with self._locked():
            data = self.read()
            record = data["datasets"].setdefault(dataset_id, {"num_examples": num_examples, "entries": []})
            record["num_examples"] = num_examples
            record["entries"].append({
                "noise_multiplier": float(sigma), "sample_rate": float(q), "steps": int(steps),
                "delta": float(delta), "accountant": accountant, "run": run, "round": round,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **({"release": release} if release else {}),
            })
            self._write(data)
        return self.spent(dataset_id, delta, accountant)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, data: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
