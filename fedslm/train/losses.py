"""Per-record losses: one loss per record, never a batch-level token average.

DP-SGD clips each record's gradient, so the loss must be a function of that
record alone. HF's ``outputs.loss`` for a causal LM averages over every
token in the batch, which weights a record by its share of the batch's
tokens and couples records; here each sequence's loss is the mean over its
own target tokens.

A causal LM's output layer is most of its cost (Gemma-3-270M: a 262,144-token vocabulary, 168 M
of its 268 M multiply-adds per token), and only the target tokens' logits enter the loss: for
the architectures listed in ``_TARGETS_ONLY`` the decoder's hidden states are taken and the output
layer is applied to the target positions alone. The losses and their per-record gradients are
the same as from the full logits (``tests/test_causal.py`` checks both); any other architecture,
or one whose config post-processes its logits (softcapping), takes the full-logits path.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fedslm.data.tasks import IGNORE_INDEX


def classification_losses(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction="none")


# Model types whose causal-LM head is exactly ``get_output_embeddings()(decoder(...).last_hidden_state)``
# (no logit post-processing other than the softcapping checked below); each is tested.
_TARGETS_ONLY = frozenset({"llama", "gemma3_text"})


def _decoder_and_head(model: nn.Module) -> Optional[tuple[nn.Module, nn.Module]]:
    """The decoder and output layer of a (PEFT- and Opacus-wrapped) causal LM, when the head may be
    applied to target positions alone; else None."""
    inner = getattr(model, "_module", model)  # Opacus' GradSampleModule
    hf = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # PEFT
    config = getattr(hf, "config", None)
    if getattr(config, "model_type", None) not in _TARGETS_ONLY or getattr(config, "final_logit_softcapping", None):
        return None
    decoder, head = hf.get_decoder(), hf.get_output_embeddings()
    return (decoder, head) if decoder is not None and head is not None else None


def token_losses(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of next-token prediction and the mask of target tokens, both [B, T-1]
    (zero where there is no target)."""
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    parts = _decoder_and_head(model)
    if parts is not None:
        decoder, head = parts
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        rows, cols = mask.nonzero(as_tuple=True)
        logits = head(hidden[rows, cols])  # hidden state t predicts token t + 1
        picked = F.cross_entropy(logits.float(), targets[rows, cols], reduction="none")
        nll = torch.zeros(targets.shape, dtype=picked.dtype, device=picked.device).index_put((rows, cols), picked)
        return nll, mask
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1, :]
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(targets.shape)
    return nll, mask


def causal_lm_losses(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    nll, mask = token_losses(model, batch)
    return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


PER_RECORD_LOSS = {
    "classification": classification_losses,
    "causal_lm": causal_lm_losses,
}
