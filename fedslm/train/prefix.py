"""The frozen-prefix cache: compute the frozen layers once, train only from where LoRA starts.

With ``lora.layers: k`` only the top k encoder layers carry LoRA (PEFT's ``layers_to_transform``)
and ``k = 0`` trains the classifier head alone. Everything below layer L − k is then a fixed
function of the record and the public base: the same for every round, every step and every DP
noise draw. A node computes it once (dropout off, as in evaluation), keeps it in memory and in a
0600 file, and trains and scores from it:

- ``k = 0``: the cache is the pooled sentence vector of each record, ``[n, d]``; a step is the
  head's forward and backward, so full-batch DP steps cost milliseconds;
- ``k > 0``: the cache is the hidden states entering layer L − k, ``[n, T, d]`` with each
  record's attention mask; a step runs the top k layers, the pooler and the head.

:class:`Suffix` is the model from the cache on: the same modules as the PEFT model (the same
parameters, so the adapter state, the wire and aggregation do not change), called in the same
order as the uncached forward. ``tests/test_prefix.py`` checks that its logits and per-record
gradients equal the uncached model's.

Computing the cache sorts records by length and batches similar lengths together (records are
short and padding is most of a padded batch's cost); the order of the rows is restored after.
Only encoder classifiers of the BERT family have this layout (``model.pooling``'s encoders);
anything else is refused naming ``lora.layers``.

The cache holds what the records look like to the model; it is as private as the records. Files
are written 0600 in a 0700 folder, named by a digest of the token ids, the base fingerprint and
the layout, so a changed base, length, pooling or record never reads a stale one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedslm.cachedir import CACHE_ENV, cache_dir  # noqa: F401 - re-exported: fedslm.train.prefix.cache_dir
from fedslm.data.tasks import Encoded
from fedslm.errors import ConfigError

log = logging.getLogger("fedslm.prefix")


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(the encoder with .embeddings/.encoder.layer/.pooler, the classifier model with .dropout/.classifier)."""
    inner = model
    while hasattr(inner, "base_model") and inner.base_model is not inner and not hasattr(inner, "classifier"):
        inner = inner.base_model
    if hasattr(inner, "model") and not hasattr(inner, "classifier"):  # PEFT's LoraModel
        inner = inner.model
    encoder = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    ok = (encoder is not None and hasattr(encoder, "embeddings") and hasattr(getattr(encoder, "encoder", None), "layer")
          and hasattr(inner, "classifier") and hasattr(inner, "dropout") and getattr(encoder, "pooler", None) is not None)
    if not ok:
        kind = getattr(getattr(inner, "config", None), "model_type", type(inner).__name__)
        raise ConfigError(f"lora.layers needs an encoder classifier of the BERT family with a pooler "
                          f"(model.task: classification); '{kind}' has another layout (leave lora.layers unset)")
    return encoder, inner, inner.classifier


def num_layers(model: nn.Module) -> int:
    encoder, _, _ = _parts(model)
    return len(encoder.encoder.layer)


def _mask(encoder: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    masks = encoder._create_attention_masks(attention_mask=attention_mask, encoder_attention_mask=None,
                                            embedding_output=hidden, encoder_hidden_states=None, cache=None)
    return masks[0]


def _pool(encoder: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    pooler = encoder.pooler
    if hasattr(pooler, "mask"):  # fedslm's MaskedMeanPooler reads the batch's mask
        pooler.mask = attention_mask
        try:
            return pooler(hidden)
        finally:
            pooler.mask = None
    return pooler(hidden)


@dataclass
class Features:
    """The cached outputs of the frozen layers for one split, row i for record i."""

    hidden: torch.Tensor  # [n, d] (k = 0) or [n, T, d]
    mask: Optional[torch.Tensor]  # [n, T] (k > 0), else None
    labels: torch.Tensor  # [n]
    layers: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def nbytes(self) -> int:
        tensors = [self.hidden, self.labels] + ([self.mask] if self.mask is not None else [])
        return sum(t.element_size() * t.nelement() for t in tensors)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if (self.mask is None and len(idx) == len(self) and not self.hidden.is_inference()
                and torch.equal(idx, torch.arange(len(self)))):
            # Every record in order (a full-batch step): the cached rows themselves, not a copy of them.
            # Read-only to every caller (the engines compute new tensors from them). Not vectors compute()
            # has just made: those are inference tensors, which autograd (Opacus, FedProx) refuses to save.
            return {"hidden": self.hidden, "labels": self.labels}
        out = {"hidden": self.hidden[idx], "labels": self.labels[idx]}
        if self.mask is not None:
            mask = self.mask[idx]
            width = max(int(mask.sum(1).max()), 1) if len(idx) else 1  # trim the batch's common padding
            out["hidden"], out["attention_mask"] = out["hidden"][:, :width], mask[:, :width]
        return out


class Suffix(nn.Module):
    """The classifier from the cache on: top ``layers`` encoder layers (or none), pooler, dropout, head."""

    def __init__(self, model: nn.Module, layers: int):
        super().__init__()
        encoder, inner, classifier = _parts(model)
        total = len(encoder.encoder.layer)
        if not 0 <= layers <= total:
            raise ConfigError(f"lora.layers={layers}: this model has {total} encoder layers (0 = the head alone)")
        self.layers = layers
        self.top = nn.ModuleList(list(encoder.encoder.layer)[total - layers:])
        self.dropout = inner.dropout
        self.classifier = classifier
        self._encoder = [encoder]  # not a submodule: its frozen lower layers are not part of this one

    def forward(self, hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.layers > 0:
            encoder = self._encoder[0]
            mask = _mask(encoder, hidden, attention_mask)
            for layer in self.top:
                hidden = layer(hidden, mask)
            hidden = _pool(encoder, hidden, attention_mask)
        return self.classifier(self.dropout(hidden))

    def losses(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(batch["hidden"], batch.get("attention_mask"))
        return F.cross_entropy(logits.float(), batch["labels"], reduction="none")


@torch.inference_mode()
def compute(model: nn.Module, enc: Encoded, layers: int, batch_size: int = 256, precision: str = "fp32") -> Features:
    """The frozen layers' outputs for every record of ``enc`` (dropout off), batched by length, in float32.
    ``precision`` "bf16": computed by a bfloat16 copy of the encoder (the model itself is not changed)."""
    from fedslm.data.tasks import _pad

    encoder, _, _ = _parts(model)
    total = len(encoder.encoder.layer)
    if not 0 <= layers <= total:
        raise ConfigError(f"lora.layers={layers}: this model has {total} encoder layers (0 = the head alone)")
    if precision == "bf16":
        import copy

        encoder = copy.deepcopy(encoder).to(torch.bfloat16)
    elif precision != "fp32":
        raise ValueError(f"feature precision must be fp32 or bf16, got {precision!r}")
    was = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device  # computed where the model is; kept on the CPU
    n = len(enc)
    order = sorted(range(n), key=lambda i: len(enc.input_ids[i]))
    width = max((len(ids) for ids in enc.input_ids), default=1)
    dim = encoder.config.hidden_size
    hidden = torch.zeros((n, dim) if layers == 0 else (n, width, dim), dtype=torch.float32)
    mask_all = None if layers == 0 else torch.zeros((n, width), dtype=torch.long)
    try:
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            ids, mask = _pad([enc.input_ids[i] for i in rows], enc.pad_id)
            ids, mask = ids.to(device), mask.to(device)
            h = encoder.embeddings(input_ids=ids)
            ext = _mask(encoder, h, mask)
            for layer in list(encoder.encoder.layer)[:total - layers]:
                h = layer(h, ext)
            idx = torch.as_tensor(rows)
            if layers == 0:
                hidden[idx] = _pool(encoder, h, mask).float().cpu()
            else:
                hidden[idx, :h.shape[1]] = h.float().cpu()
                mask_all[idx, :mask.shape[1]] = mask.cpu()
    finally:
        encoder.train(was)
    labels = torch.as_tensor(enc.targets, dtype=torch.long)
    return Features(hidden, mask_all, labels, layers)


def cache_key(enc: Encoded, fingerprint: str, layers: int, layout: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"fingerprint": fingerprint, "layers": layers, "layout": layout, "pad": enc.pad_id,
                         "v": 1}, sort_keys=True).encode())
    h.update(_framed_ids(enc))
    h.update(json.dumps(list(map(int, enc.targets))).encode())
    return h.hexdigest()


_FRAMED = "_fedslm_framed_ids"


def _framed_ids(enc: Encoded) -> bytes:
    """Each record's length, then its ids, as 4-byte little-endian words: the bytes the cache key hashes.
    Built in numpy and kept on ``enc`` while its list of records is the same (a simulation's process keys the
    same split every round; nothing edits an encoded split's ids in place)."""
    kept = enc.__dict__.get(_FRAMED)
    if kept is not None and kept[0] is enc.input_ids and kept[1] == len(enc.input_ids):
        return kept[2]
    words = _frame(enc.input_ids)
    enc.__dict__[_FRAMED] = (enc.input_ids, len(enc.input_ids), words)
    return words


def _frame(input_ids: list[list[int]]) -> bytes:
    lengths = np.fromiter((len(ids) for ids in input_ids), dtype=np.int64, count=len(input_ids))
    ids = np.fromiter(itertools.chain.from_iterable(input_ids), dtype=np.int64, count=int(lengths.sum()))
    if lengths.size and (lengths.max() >= 2**32 or (ids.size and (ids.min() < 0 or ids.max() >= 2**32))):
        raise ValueError("token ids and record lengths must fit 4 unsigned bytes")
    words = np.empty(lengths.size + ids.size, dtype="<u4")
    starts = np.arange(lengths.size) + np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    is_id = np.ones(words.size, dtype=bool)
    is_id[starts] = False
    words[starts] = lengths
    words[is_id] = ids
    return words.tobytes()


_MEMORY: dict[str, Features] = {}


def features(model: nn.Module, enc: Encoded, layers: int, fingerprint: str, layout: dict, *,
             folder: Optional[Path] = None, persist: bool = True) -> Features:
    """The cached features of ``enc``: from memory, else the node's 0600 file, else computed (and kept)."""
    key = cache_key(enc, fingerprint, layers, layout)
    if key in _MEMORY:
        return _MEMORY[key]
    folder = folder or cache_dir()
    path = folder / f"{key}.pt"
    feats = None
    if persist and path.is_file():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            feats = Features(data["hidden"], data.get("mask"), data["labels"], int(data["layers"]))
        except Exception as exc:  # noqa: BLE001 - a torn or foreign file is recomputed, never trusted
            log.warning("feature cache %s unreadable (%s); computing it again", path, exc)
            feats = None
        if feats is not None and (len(feats) != len(enc) or feats.layers != layers
                                  or not torch.equal(feats.labels, torch.as_tensor(enc.targets, dtype=torch.long))
                                  or (feats.mask is None) != (layers == 0) or feats.hidden.dtype != torch.float32):
            log.warning("feature cache %s does not fit this split; computing it again", path)
            feats = None
    if feats is None and layers == 0:
        from fedslm.train.feature_pool import from_pool

        feats = from_pool(folder, enc, fingerprint, layout)
        if feats is not None:  # a simulation's shared pass: no file of this split's own (it would be a copy)
            persist = False
    if feats is None:
        import time

        start = time.perf_counter()
        feats = compute(model, enc, layers, precision=layout.get("precision", "fp32"))
        log.info("frozen-prefix features of %d records (lora.layers=%d) in %.1f s", len(enc), layers,
                 time.perf_counter() - start)
        if persist:
            _write(path, feats)
    remember(key, feats)
    return feats


def remember(key: str, feats) -> None:  # noqa: ANN001 - Features or causal_prefix.CausalFeatures
    """Keep ``feats`` in this process under ``key``, the oldest first out past MAX_FILES or max_limit()."""
    _MEMORY.pop(key, None)
    budget = max_limit()
    while _MEMORY and (len(_MEMORY) >= MAX_FILES or sum(f.nbytes() for f in _MEMORY.values()) + feats.nbytes() > budget):
        _MEMORY.pop(next(iter(_MEMORY)))  # the oldest first
    _MEMORY[key] = feats


def layout_of(model_cfg, device: Optional[torch.device] = None) -> dict:
    """What a split's cached vectors depend on besides the base and the records: pooling, length, name and,
    when not fp32, the precision they are computed in on ``device`` (None: the CPU; fp32 files keep the keys
    they had before model.feature_precision existed)."""
    from fedslm.train.device import feature_precision

    layout = {"pooling": model_cfg.pooling, "normalize": model_cfg.normalize, "max_length": model_cfg.max_length,
              "name": model_cfg.name}
    precision = feature_precision(getattr(model_cfg, "feature_precision", "fp32"), device or torch.device("cpu"))
    if precision != "fp32":
        layout["precision"] = precision
    return layout


def _write(path: Path, feats: Features) -> None:
    data = {"hidden": feats.hidden, "labels": feats.labels, "layers": feats.layers}
    if feats.mask is not None:
        data["mask"] = feats.mask
    _write_tensors(path, data)


def _write_tensors(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(data, fh)
        os.replace(tmp, path)
    except OSError as exc:  # a full disk: no torn file left, and training goes on from memory
        tmp.unlink(missing_ok=True)
        log.warning("could not write the feature cache %s (%s); kept in memory only", path, exc)
        return
    prune(path.parent, keep=path)


def cache_files(folder: Optional[Path] = None) -> list[tuple[Path, int, float]]:
    """(path, bytes, mtime) of this module's own cache files in ``folder``, newest first. Only its own
    (64 hex digits .pt), so a cache dir pointed at another folder loses nothing."""
    folder = folder or cache_dir()
    found = []
    for f in folder.glob("*.pt") if folder.is_dir() else []:
        if len(f.stem) == 64 and all(c in "0123456789abcdef" for c in f.stem):
            try:
                st = f.stat()
            except FileNotFoundError:  # pruned meanwhile by another process
                continue
            found.append((f, st.st_size, st.st_mtime))
    return sorted(found, key=lambda item: item[2], reverse=True)


def prune(folder: Path, *, keep: Optional[Path] = None, max_bytes: Optional[int] = None) -> list[Path]:
    """Delete the oldest cache files until at most MAX_FILES remain and their total is at most
    ``max_bytes`` ($FEDSLM_CACHE_MAX_BYTES, default 4 GiB): requests for many bases, layouts and depths
    cannot fill the node's disk. ``keep`` (the file just written) stays. Returns what was deleted."""
    budget = max_limit() if max_bytes is None else max_bytes
    total, kept, gone = 0, 0, []
    for f, size, _ in cache_files(folder):
        if f == keep or (kept < MAX_FILES and total + size <= budget):
            total, kept = total + size, kept + 1
            continue
        f.unlink(missing_ok=True)
        gone.append(f)
    return gone


def max_limit() -> int:
    """$FEDSLM_CACHE_MAX_BYTES (default 4 GiB): the most bytes of features for one split, in memory, and in
    the cache folder altogether."""
    return int(os.environ.get(MAX_BYTES_ENV, DEFAULT_MAX_BYTES))


# Above this many bytes of features a split is trained uncached (the same model, run whole): a request
# for k > 0 layers at a long max_length on a large node must not fill its memory or disk.
MAX_BYTES_ENV = "FEDSLM_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 4 << 30
# Cache files kept per folder (the oldest go first): each base, layout and depth is a file of its own.
MAX_FILES = 16


def estimated_bytes(model: nn.Module, enc: Encoded, layers: int) -> int:
    encoder, _, _ = _parts(model)
    width = max((len(ids) for ids in enc.input_ids), default=1)
    per_record = encoder.config.hidden_size * (1 if layers == 0 else width) * 4 + (0 if layers == 0 else width * 8)
    return len(enc) * per_record


def split_features(model: nn.Module, fingerprint: str, enc: Encoded, model_cfg, layers: Optional[int], *,
                   folder: Optional[Path] = None) -> Optional[Features]:
    """The cached prefix of one split when ``lora.layers`` is set (else None: train the whole model,
    also when the features would pass $FEDSLM_CACHE_MAX_BYTES, default 4 GiB)."""
    if getattr(model_cfg, "task", "classification") == "causal_lm":
        from fedslm.train import causal_prefix

        return causal_prefix.split_features(model, fingerprint, enc, model_cfg, layers, folder=folder)  # type: ignore[return-value]
    if layers is None or len(enc) == 0:
        return None
    limit = max_limit()
    size = estimated_bytes(model, enc, layers)
    if size > limit:
        log.warning("frozen-prefix features of %d records would take %.1f GB (limit %s=%d): training without "
                    "the cache", len(enc), size / 1e9, MAX_BYTES_ENV, limit)
        return None
    return features(model, enc, layers, fingerprint, layout_of(model_cfg, next(model.parameters()).device),
                    folder=folder)
