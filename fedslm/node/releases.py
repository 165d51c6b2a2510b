"""Updates a node has already paid for, kept so a repeated request is answered without a new charge.

When a coordinator dies after a node charged its ledger for round r but before the
round was aggregated, the resumed run asks for round r again, with the same global
adapter. Training again would spend the budget twice for one round. Instead the
node keeps the update it released (a file beside its ledger, named in that round's
ledger entry with its SHA-256) and sends the same bytes again: repeating an output
already paid for is post-processing and costs no privacy. A request that differs in
any way (another run, round or input adapter) is trained and charged as new.

The round's cost is reserved in the ledger before training; the file is written after
training and only trusted once the round's ledger entry names it with a matching hash,
so a crash in between never yields an unpaid release. Each file is named by its run,
round *and input adapter*, so a second request for one round with another adapter is
kept beside the first (and a later replay of either is found, not charged again).
Files and folder are readable by the node's user only (0600 / 0700).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import load_file, save_file


def adapter_digest(state: Optional[Mapping[str, torch.Tensor]]) -> str:
    """SHA-256 over the adapter's keys, dtypes, shapes and values ('' for no adapter)."""
    if state is None:
        return ""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Releases:
    """The folder ``<ledger>.releases/`` of one node's paid-for updates, newest round per run."""

    FILE_MODE = 0o600

    def __init__(self, ledger_path: str | Path):
        ledger_path = Path(ledger_path).expanduser()
        self.folder = ledger_path.with_name(ledger_path.name + ".releases")

    @staticmethod
    def _prefix(unit: str, run: str) -> str:
        return hashlib.sha256(f"{unit}|{run}".encode()).hexdigest()[:16]

    def save(self, unit: str, run: str, round_idx: int, input_digest: str,
             state: Mapping[str, torch.Tensor], metrics: Mapping[str, Any],
             cohort: Optional[list[int]] = None) -> dict[str, Any]:
        """Write the update; returns what the round's ledger entry records about it. ``cohort``: the
        SecAgg+ neighbours it was masked among (None: it was sent in the clear)."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        prefix = self._prefix(unit, run)
        path = self.folder / f"{prefix}-round-{round_idx}-{(input_digest or 'none')[:16]}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        # Created 0600 before a byte is written, so no other user can ever read it.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, self.FILE_MODE))
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp),
                  metadata={"metrics": json.dumps(dict(metrics)), "cohort": json.dumps(cohort)})
        os.chmod(tmp, self.FILE_MODE)
        os.replace(tmp, path)
        for old in self.folder.glob(f"{prefix}-round-*.safetensors"):  # earlier rounds can never be asked again
            if not old.name.startswith(f"{prefix}-round-{round_idx}-"):
                old.unlink(missing_ok=True)
        return {"input": input_digest, "file": path.name, "sha256": _file_sha(path)}

    def find(self, entries: list[dict[str, Any]], run: str, round_idx: int,
             input_digest: str) -> Optional[tuple[dict[str, torch.Tensor], dict[str, Any], Optional[list[int]]]]:
        """The update already paid for this exact request, if its ledger entry and file agree: its
        tensors, metrics and the SecAgg+ cohort it was masked among (None: sent in the clear)."""
        for entry in reversed(entries):
            release = entry.get("release") or {}
            if entry.get("run") != run or entry.get("round") != round_idx or release.get("input") != input_digest:
                continue
            path = self.folder / str(release.get("file", ""))
            if not path.is_file() or _file_sha(path) != release.get("sha256"):
                return None
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            return load_file(str(path)), json.loads(meta.get("metrics", "{}")), json.loads(meta.get("cohort", "null"))
        return None
