"""A node's SecAgg+ session record on disk: the last round it set up per run, and the survivor list it signed.

Flower's SecAgg+ mod keeps a session's secrets in ``context.state``, which lives in the SuperNode's
memory, and so did fedslm's "rounds only move forward" and "one survivor list per round" rules.
After a SuperNode restart both were forgotten: a coordinator could set the node up again for a
round it had already served and collect a second signed survivor list for that run and round,
which is exactly the second story about who dropped out that the consistency stage exists to rule
out (another institution counts this node's signature towards its majority). This record keeps
both facts beside the node's ledger, as ``<ledger>.secagg.json`` (0600, atomic writes under a file
lock), so they outlive the process. A restart loses the session's secrets (Flower's), never the
record: the interrupted round cannot be resumed or repeated, and the next round is set up afresh.

Losing the file is like losing the ledger: delete it only with the ledger's backup in mind. A file
that cannot be read stops secure aggregation on this node.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from fedslm.errors import FedslmError
from fedslm.privacy.ledger import locked, write_json

FORMAT = "fedslm-secagg-sessions/1"


class SessionRecordError(FedslmError):
    """The record refuses a setup or a signature, or cannot be read."""


def record_path(ledger: str | Path) -> Path:
    ledger = Path(ledger).expanduser()
    return ledger.with_name(ledger.name + ".secagg.json")


MAX_RUNS = 10_000  # protocol runs one record holds: a coordinator must not grow it (and every write) without end
MAX_ROUND = 2**32


def owner(policy: Any) -> str:
    """Whose record an entry is: the institution's signing identity (its public key), else its privacy unit.

    Two SuperNodes may share one ledger file (different privacy units): each keeps its own rounds. What
    must never happen twice per run and round is one *signer*'s setup and signature."""
    sa = policy.secure_aggregation
    if sa.identity_key:
        from fedslm.wire import identity

        return "key:" + identity.raw_public(identity.load_private(sa.identity_key).public_key()).hex()
    return "unit:" + str(policy.privacy.unit)


class SessionRecord:
    """``{"format", "runs": {"<owner>|<run_id>": {"round": last round set up, "signed": list or null}}}``.

    One file beside the ledger; entries keyed by :func:`owner` and Flower's run id."""

    def __init__(self, ledger: str | Path, owner: str = ""):
        self.path = record_path(ledger)
        self.owner = owner

    def _key(self, run_id: int) -> str:
        return f"{self.owner}|{int(run_id)}"

    def read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"format": FORMAT, "runs": {}}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SessionRecordError(f"SecAgg+ session record {self.path} is unreadable ({exc}); refusing secure "
                                     "aggregation, since a lost record would let a served round be set up again") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("runs"), dict):
            raise SessionRecordError(f"SecAgg+ session record {self.path} is not a {FORMAT} file")
        return data

    def last_round(self, run_id: int) -> int:
        entry = self.read()["runs"].get(self._key(run_id))
        return int(entry["round"]) if entry else -1

    def signed(self, run_id: int) -> Optional[list[int]]:
        entry = self.read()["runs"].get(self._key(run_id))
        return None if not entry or entry["signed"] is None else [int(n) for n in entry["signed"]]

    def set_up(self, run_id: int, round_idx: int) -> None:
        """Record a setup for ``round_idx`` of ``run_id``; refused unless it is later than every round set up before."""
        if not 0 <= int(round_idx) < MAX_ROUND:
            raise SessionRecordError(f"a setup for round {round_idx}, outside [0, 2**32)")
        with locked(self.path):
            data = self.read()
            last = data["runs"].get(self._key(run_id))
            if last is not None and int(round_idx) <= int(last["round"]):
                raise SessionRecordError(f"protocol run {run_id}/{round_idx}: this node set up round {last['round']} of "
                                         "this run already; rounds only move forward (a setup is never repeated, "
                                         "not even after a restart)")
            if last is None and len(data["runs"]) >= MAX_RUNS:
                raise SessionRecordError(
                    f"SecAgg+ session record {self.path} holds {MAX_RUNS} protocol runs; refusing a new one. Once no "
                    "run it names can still be going on, move it aside (keep it with the ledger's backup)")
            data["runs"][self._key(run_id)] = {"round": int(round_idx), "signed": None}
            write_json(self.path, data)

    def sign(self, run_id: int, round_idx: int, survivors: list[int]) -> None:
        """Record the survivor list signed for the round set up last; refused for another round or another list."""
        with locked(self.path):
            data = self.read()
            entry: Optional[dict[str, Any]] = data["runs"].get(self._key(run_id))
            if entry is None or int(entry["round"]) != int(round_idx):
                raise SessionRecordError(f"a survivor list for {run_id}/{round_idx}, which is not the round this node "
                                         "set up last")
            if entry["signed"] is not None and [int(n) for n in entry["signed"]] != list(survivors):
                raise SessionRecordError(f"a second survivor list for {run_id}/{round_idx}; this node signed another")
            entry["signed"] = [int(n) for n in survivors]
            write_json(self.path, data)
