"""A run folder's checkpoint: written after each finished round, read back to resume a run that died.

The checkpoint (``checkpoint/``: the global adapter, the server optimiser's state, the last finished
round and the run id) is written after that round's line in ``metrics.jsonl``, so it never runs ahead
of it; a resumed run must carry the same config, and a finished run folder is never continued.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from safetensors.torch import load_file, save_file

from fedslm.config import Config, to_yaml
from fedslm.errors import FedslmError

CHECKPOINT = "checkpoint"


class RunFolderError(FedslmError):
    """The run folder holds something this run must not overwrite or continue."""


@dataclass(frozen=True)
class Checkpoint:
    round: int
    run_id: str
    adapter: dict[str, torch.Tensor]
    strategy_state: dict[str, torch.Tensor]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def find_checkpoint(out: Path, cfg: Config) -> Optional[Checkpoint]:
    """The checkpoint to resume in run folder ``out``, or None for a fresh run.

    Refuses a finished run, a checkpoint made with a different config (naming the keys that
    differ), and any checkpoint when ``output.resume`` is false.
    """
    state_file = out / CHECKPOINT / "state.json"
    if (out / "summary.json").exists():
        raise RunFolderError(f"run folder {out} already holds a finished run (summary.json); choose a new output.dir")
    if not state_file.exists():
        if (out / "metrics.jsonl").exists() and not cfg.output.resume:
            raise RunFolderError(f"run folder {out} already holds a run (metrics.jsonl); choose a new output.dir")
        return None
    if not cfg.output.resume:
        raise RunFolderError(f"run folder {out} holds an unfinished run's checkpoint and output.resume=false; "
                             "choose a new output.dir, or set output.resume=true to continue it")
    before = _flat(yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8")))
    now = _flat(yaml.safe_load(to_yaml(cfg)))
    differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and k != "output.resume")
    if differ:
        shown = ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in differ[:5])
        raise RunFolderError(f"run folder {out} holds a checkpoint of a different config: {shown}; resume with the "
                             "same config, or choose a new output.dir")
    meta = json.loads(state_file.read_text(encoding="utf-8"))
    strategy_file = out / CHECKPOINT / "strategy.safetensors"
    return Checkpoint(
        round=int(meta["round"]), run_id=str(meta["run_id"]),
        adapter=load_file(str(out / CHECKPOINT / "adapter.safetensors")),
        strategy_state=load_file(str(strategy_file)) if strategy_file.exists() else {},
    )


def save_tensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


def atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_checkpoint(out: Path, cfg: Config, run_id: str, server_round: int, adapter: dict[str, torch.Tensor],
                     strategy_state: Optional[dict[str, torch.Tensor]] = None) -> None:
    """The global adapter and server state after ``server_round`` (0: the initial adapter), in ``out``;
    ``state.json`` last, so a checkpoint it names is complete."""
    folder = out / CHECKPOINT
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / "adapter.safetensors", adapter)
    save_tensors(folder / "strategy.safetensors", strategy_state or {})
    atomic_write(folder / "state.json", json.dumps({
        "round": server_round, "run_id": run_id, "strategy": cfg.federation.strategy,
        "rounds_planned": cfg.federation.rounds,
    }).encode())
