"""The frozen-prefix cache of a causal LM: the decoder below its first adapted layer, computed once.

With ``lora.layers: k`` (k ≥ 1) only the top k decoder layers carry LoRA, so the hidden states
entering layer L − k are a fixed function of the record and the public base: the same in every
step, round and noise draw. A node computes them once (dropout off, as in evaluation), keeps them
in memory and in a 0600 file beside the encoder's (:mod:`fedslm.train.prefix`: same folder, budget
and pruning), and trains and scores from there.

What the top layers need besides the hidden states is recomputed each step from the attention
mask alone, as the decoder's own forward does it: the position ids (0..T−1; records are
right-padded, so a record's positions do not depend on its batch), the rotary embeddings
(Gemma-3: one table per layer type, local and global bases), the causal mask (Gemma-3: the
sliding-window mask for its sliding layers, the full causal mask for its global ones), then the
final norm and the output layer on the target positions alone (as :func:`fedslm.train.losses.token_losses`),
with Gemma's final logit softcapping where the config sets it.

:class:`CausalSuffix` holds the same modules as the PEFT model (the same parameters: the adapter,
the wire and aggregation do not change). Only the architectures whose decoder forward is written
out here are accepted (Llama, Gemma-3 text); anything else is refused naming ``lora.layers``.
``tests/test_causal_prefix.py`` checks logits, losses and per-record gradients against the uncached model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedslm.data.tasks import IGNORE_INDEX, Encoded
from fedslm.errors import ConfigError
from fedslm.train import prefix

log = logging.getLogger("fedslm.prefix")

# Model types whose decoder forward CausalSuffix reproduces (each tested against the uncached model).
ARCHITECTURES = frozenset({"llama", "gemma3_text"})


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(the HF causal LM, its decoder with .layers/.norm/.rotary_emb, its output layer)."""
    inner = getattr(model, "_module", model)  # Opacus' GradSampleModule
    hf = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # PEFT
    config = getattr(hf, "config", None)
    kind = getattr(config, "model_type", type(hf).__name__)
    decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else None
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if (kind not in ARCHITECTURES or decoder is None or head is None
            or getattr(config, "use_bidirectional_attention", False)):
        raise ConfigError(f"lora.layers for a causal LM needs a decoder of the {' or '.join(sorted(ARCHITECTURES))} "
                          f"architecture; '{kind}' has another layout (leave lora.layers unset)")
    return hf, decoder, head


def num_layers(model: nn.Module) -> int:
    return len(_parts(model)[1].layers)


def _check_layers(total: int, layers: int) -> None:
    if not 1 <= layers <= total:
        raise ConfigError(f"lora.layers={layers}: this model has {total} decoder layers (a causal LM trains 1 to "
                          f"{total} of them)")


class _Upper:
    """The decoder's per-batch inputs of its layers from ``start`` on: masks and rotary tables."""

    def __init__(self, decoder: nn.Module, start: int):
        self.decoder, self.start = decoder, start
        self.config = decoder.config
        self.gemma = self.config.model_type == "gemma3_text"

    def run(self, layers: Sequence[nn.Module], hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        kw = {"config": self.config, "inputs_embeds": hidden, "attention_mask": attention_mask, "cache": None,
              "position_ids": position_ids}
        rotary = self.decoder.rotary_emb
        if self.gemma:
            types = self.config.layer_types
            masks = {"full_attention": create_causal_mask(**kw), "sliding_attention": create_sliding_window_causal_mask(**kw)}
            tables = {t: rotary(hidden, position_ids, t) for t in set(types)}
            for i, layer in enumerate(layers, start=self.start):
                hidden = layer(hidden, attention_mask=masks[types[i]], position_embeddings=tables[types[i]],
                               position_ids=position_ids)
        else:
            mask, table = create_causal_mask(**kw), rotary(hidden, position_ids=position_ids)
            for layer in layers:
                hidden = layer(hidden, attention_mask=mask, position_embeddings=table, position_ids=position_ids)
        return hidden


class CausalSuffix(nn.Module):
    """The causal LM from the cache on: the top ``layers`` decoder layers, the final norm, the output layer.

    ``forward`` returns each record's loss (mean next-token NLL over its own target tokens)."""

    def __init__(self, model: nn.Module, layers: int):
        super().__init__()
        hf, decoder, head = _parts(model)
        total = len(decoder.layers)
        _check_layers(total, layers)
        self.layers = layers
        self.top = nn.ModuleList(list(decoder.layers)[total - layers:])
        self.norm = decoder.norm
        self.head = head
        self.softcap = getattr(hf.config, "final_logit_softcapping", None)
        self._upper = _Upper(decoder, total - layers)  # not a submodule: the frozen rest is not part of this one

    def hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The decoder's final (normed) hidden states."""
        w = self.norm.weight
        return self.norm(self._upper.run(self.top, hidden.to(w.device, w.dtype), attention_mask.to(w.device)))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._logits(self.hidden(hidden, attention_mask))

    def token_losses(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                     labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token NLL and target mask, [B, T-1], the output layer applied to target positions only."""
        h = self.hidden(hidden, attention_mask)
        targets = labels[:, 1:].to(h.device)
        mask = targets != IGNORE_INDEX
        rows, cols = mask.nonzero(as_tuple=True)
        picked = F.cross_entropy(self._logits(h[rows, cols]).float(), targets[rows, cols], reduction="none")
        nll = torch.zeros(targets.shape, dtype=picked.dtype, device=picked.device).index_put((rows, cols), picked)
        return nll, mask

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        nll, mask = self.token_losses(hidden, attention_mask, labels)
        return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


@dataclass
class CausalFeatures:
    """The hidden states entering the first adapted decoder layer, row i for record i (right-padded)."""

    hidden: torch.Tensor  # [n, T, d] float32
    mask: torch.Tensor  # [n, T]
    labels: torch.Tensor  # [n, T], IGNORE_INDEX outside each record's targets
    layers: int
    causal = True  # what train_round and evaluate dispatch on (the encoder's Features has no such flag)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for t in (self.hidden, self.mask, self.labels))

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        mask = self.mask[idx]
        width = max(int(mask.sum(1).max()), 1) if len(idx) else 1  # trim the batch's common padding
        return {"hidden": self.hidden[idx, :width], "attention_mask": mask[:, :width],
                "labels": self.labels[idx, :width]}


def _labels(enc: Encoded, width: int) -> torch.Tensor:
    out = torch.full((len(enc), width), IGNORE_INDEX, dtype=torch.long)
    for i, t in enumerate(enc.targets):
        out[i, :len(t)] = torch.as_tensor(t, dtype=torch.long)
    return out


@torch.inference_mode()
def compute(model: nn.Module, enc: Encoded, layers: int, batch_size: int = 64) -> CausalFeatures:
    """The frozen decoder layers' outputs for every record of ``enc`` (dropout off), batched by length."""
    from fedslm.data.tasks import _pad

    _, decoder, _ = _parts(model)
    total = len(decoder.layers)
    _check_layers(total, layers)
    was = decoder.training
    decoder.eval()
    n = len(enc)
    order = sorted(range(n), key=lambda i: len(enc.input_ids[i]))
    width = max((len(ids) for ids in enc.input_ids), default=1)
    hidden = torch.zeros((n, width, decoder.config.hidden_size), dtype=torch.float32)
    mask_all = torch.zeros((n, width), dtype=torch.long)
    upper = _Upper(decoder, 0)
    device = decoder.embed_tokens.weight.device
    try:
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            ids, mask = _pad([enc.input_ids[i] for i in rows], enc.pad_id)
            h = decoder.embed_tokens(ids.to(device))
            h = upper.run(list(decoder.layers)[:total - layers], h, mask.to(device))
            idx = torch.as_tensor(rows)
            hidden[idx, :h.shape[1]] = h.float().cpu()
            mask_all[idx, :mask.shape[1]] = mask
    finally:
        decoder.train(was)
    return CausalFeatures(hidden, mask_all, _labels(enc, width), layers)


def cache_key(enc: Encoded, fingerprint: str, layers: int, layout: dict) -> str:
    """A digest of everything the cached rows depend on: the base, the cut, the layout and each record's
    token ids and targets."""
    h = hashlib.sha256()
    h.update(json.dumps({"kind": "causal", "fingerprint": fingerprint, "layers": layers, "layout": layout,
                         "pad": enc.pad_id, "v": 1}, sort_keys=True).encode())
    for ids, targets in zip(enc.input_ids, enc.targets):
        for seq in (ids, targets):
            h.update(len(seq).to_bytes(4, "little"))
            h.update(b"".join(int(t).to_bytes(8, "little", signed=True) for t in seq))
    return h.hexdigest()


def _fits(feats: CausalFeatures, enc: Encoded, layers: int) -> bool:
    width = max((len(ids) for ids in enc.input_ids), default=1)
    return (len(feats) == len(enc) and feats.layers == layers and feats.hidden.dtype == torch.float32
            and tuple(feats.hidden.shape[:2]) == (len(enc), width) and tuple(feats.mask.shape) == (len(enc), width)
            and torch.equal(feats.labels, _labels(enc, width)))


def features(model: nn.Module, enc: Encoded, layers: int, fingerprint: str, layout: dict, *,
             folder: Optional[Path] = None, persist: bool = True) -> CausalFeatures:
    """The cached prefix of ``enc``: from memory, else the node's 0600 file, else computed (and kept)."""
    key = cache_key(enc, fingerprint, layers, layout)
    known = prefix._MEMORY.get(key)
    if isinstance(known, CausalFeatures):
        return known
    folder = folder or prefix.cache_dir()
    path = folder / f"{key}.pt"
    feats = None
    if persist and path.is_file():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            feats = CausalFeatures(data["hidden"], data["mask"], data["labels"], int(data["layers"]))
        except Exception as exc:  # noqa: BLE001 - a torn or foreign file is recomputed, never trusted
            log.warning("feature cache %s unreadable (%s); computing it again", path, exc)
            feats = None
        if feats is not None and not _fits(feats, enc, layers):
            log.warning("feature cache %s does not fit this split; computing it again", path)
            feats = None
    if feats is None:
        start = time.perf_counter()
        feats = compute(model, enc, layers)
        log.info("frozen-prefix hidden states of %d records (lora.layers=%d) in %.1f s", len(enc), layers,
                 time.perf_counter() - start)
        if persist:
            prefix._write(path, feats)  # type: ignore[arg-type]
    prefix.remember(key, feats)
    return feats


def estimated_bytes(model: nn.Module, enc: Encoded) -> int:
    _, decoder, _ = _parts(model)
    width = max((len(ids) for ids in enc.input_ids), default=1)
    return len(enc) * width * (decoder.config.hidden_size * 4 + 16)


def split_features(model: nn.Module, fingerprint: str, enc: Encoded, model_cfg, layers: Optional[int], *,
                   folder: Optional[Path] = None) -> Optional[CausalFeatures]:
    """The cached prefix of one split when ``lora.layers`` is set (else None: train the whole model,
    also when the hidden states would pass $FEDSLM_CACHE_MAX_BYTES)."""
    if layers is None or len(enc) == 0:
        return None
    limit = prefix.max_limit()
    size = estimated_bytes(model, enc)
    if size > limit:
        log.warning("frozen-prefix hidden states of %d records would take %.1f GB (limit %s=%d): training without "
                    "the cache", len(enc), size / 1e9, prefix.MAX_BYTES_ENV, limit)
        return None
    layout = {"task": "causal_lm", "max_length": model_cfg.max_length, "name": model_cfg.name}
    return features(model, enc, layers, fingerprint, layout, folder=folder)


@torch.no_grad()
def evaluation_from_features(model: nn.Module, feats: CausalFeatures,
                             batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(each record's summed target NLL, its number of target tokens) from the cache, in eval mode."""
    suffix = CausalSuffix(model, feats.layers)
    was = suffix.training
    suffix.eval()
    sums, counts = [], []
    try:
        for start in range(0, len(feats), batch_size):
            b = feats.batch(range(start, min(start + batch_size, len(feats))))
            nll, mask = suffix.token_losses(b["hidden"], b["attention_mask"], b["labels"])
            sums.append((nll * mask).sum(1))
            counts.append(mask.sum(1))
    finally:
        suffix.train(was)
    empty = torch.zeros(0)
    return (torch.cat(sums) if sums else empty), (torch.cat(counts) if counts else empty.long())
