"""A simulation's shared feature pass (lora.layers: 0).

In simulation the base is public and every institution's records are on this machine, so `fedslm
simulate` computes the sentence vectors of the scenario's records once, before Flower starts, into one
"pool" file: one row per distinct record, found by a digest of its token ids. A node whose split has no
file of its own takes its rows from the pool when every record is there (else computes as usual;
fedslm.train.prefix.features). The pool is named by the base fingerprint, the layout and the pad id like
a split's file, so a changed base or pooling never reads it, and a changed record is not found in it. A
deployed node never gets one: nothing writes it in its folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from fedslm.data.tasks import Encoded
from fedslm.train import prefix
from fedslm.train.prefix import Features, layout_of

log = logging.getLogger("fedslm.train.prefix")


def _record_digests(enc: Encoded) -> list[bytes]:
    out = []
    for ids in enc.input_ids:
        h = hashlib.sha256(len(ids).to_bytes(4, "little"))
        h.update(b"".join(int(t).to_bytes(4, "little") for t in ids))
        out.append(h.digest())
    return out


def pool_key(fingerprint: str, layout: dict, pad_id: int) -> str:
    return hashlib.sha256(json.dumps({"fingerprint": fingerprint, "layers": 0, "layout": layout, "pad": pad_id,
                                      "pool": 1}, sort_keys=True).encode()).hexdigest()


def warm_pool(model: nn.Module, encs: Sequence[Encoded], fingerprint: str, model_cfg, *,
              folder: Optional[Path] = None, threads: Optional[int] = None) -> int:
    """Compute the head-only features (lora.layers: 0) of every distinct record of ``encs`` in one pass
    (length-sorted batches, ``threads`` torch threads: default all cores) and write the pool file
    the simulated nodes read. Returns the number of distinct records."""
    pads = {e.pad_id for e in encs}
    if len(pads) != 1:
        raise ValueError(f"the splits of one pool share a tokenizer; got pad ids {sorted(pads)}")
    seen: dict[bytes, int] = {}
    ids: list[list[int]] = []
    for enc in encs:
        for digest, row in zip(_record_digests(enc), enc.input_ids):
            if digest not in seen:
                seen[digest] = len(ids)
                ids.append(list(row))
    unique = Encoded(ids, [0] * len(ids), pads.pop())
    layout = layout_of(model_cfg, next(model.parameters()).device)
    path = (folder or prefix.cache_dir()) / f"{pool_key(fingerprint, layout, unique.pad_id)}.pt"
    known = _read_pool_file(path)  # not kept: this process (the simulation's) only writes the pool
    if known is not None and all(d in known[1] for d in seen):  # a warm cache: nothing to compute
        with contextlib.suppress(OSError):
            os.utime(path)
        return len(ids)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        feats = prefix.compute(model, unique, 0, precision=layout.get("precision", "fp32"))
    finally:
        torch.set_num_threads(before)
    digests = torch.frombuffer(bytearray(b"".join(seen)), dtype=torch.uint8).reshape(len(ids), 32) \
        if ids else torch.zeros((0, 32), dtype=torch.uint8)
    prefix._write_tensors(path, {"hidden": feats.hidden, "digests": digests, "layers": 0})
    return len(ids)


# The last pool file read by this process, by its (path, inode, size): a simulation's process looks up each
# split of every institution it serves in the same file (tens of MB). The pool is only ever replaced whole
# (prefix._write_tensors: a new file renamed over it, so a new inode), and then read again; its mtime is not
# part of the key, since every lookup touches it (os.utime, for the folder's pruning).
_LAST_POOL: dict[tuple[str, int, int], tuple[torch.Tensor, dict[bytes, int]]] = {}


def _read_pool(path: Path) -> Optional[tuple[torch.Tensor, dict[bytes, int]]]:
    """(vectors, row of each record digest) of a pool file, or None when absent, torn or foreign."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_ino, st.st_size)
    if key in _LAST_POOL:
        return _LAST_POOL[key]
    read = _read_pool_file(path)
    _LAST_POOL.clear()
    if read is not None:
        _LAST_POOL[key] = read
    return read


def _read_pool_file(path: Path) -> Optional[tuple[torch.Tensor, dict[bytes, int]]]:
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        hidden, digests = data["hidden"], data["digests"]
        ok = (isinstance(hidden, torch.Tensor) and isinstance(digests, torch.Tensor) and hidden.dim() == 2
              and hidden.dtype == torch.float32 and digests.dtype == torch.uint8
              and tuple(digests.shape) == (hidden.shape[0], 32) and int(data.get("layers", -1)) == 0)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file is ignored, never trusted
        log.warning("feature pool %s unreadable (%s); computing this split's features", path, exc)
        return None
    if not ok:
        log.warning("feature pool %s has an unexpected layout; computing this split's features", path)
        return None
    return hidden, {bytes(d): i for i, d in enumerate(digests.numpy())}


def from_pool(folder: Path, enc: Encoded, fingerprint: str, layout: dict) -> Optional[Features]:
    path = folder / f"{pool_key(fingerprint, layout, enc.pad_id)}.pt"
    pool = _read_pool(path)
    if pool is None:
        return None
    hidden, rows = pool
    try:
        idx = [rows[d] for d in _record_digests(enc)]
    except KeyError:  # a record the pass did not see (changed data or tokenizer): this split computes its own
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # in use: the newest for the folder's pruning
    labels = torch.as_tensor(enc.targets, dtype=torch.long)
    return Features(hidden[torch.as_tensor(idx, dtype=torch.long)].clone(), None, labels, 0)
