"""Per-record losses: one loss per record, never a batch-level token average.

DP-SGD clips each record's gradient, so the loss must be a function of that
record alone. HF's ``outputs.loss`` for a causal LM averages over every
token in the batch, which weights a record by its share of the batch's
tokens and couples records; here each sequence's loss is the mean over its
own target tokens.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fedslm.data.tasks import IGNORE_INDEX


def classification_losses(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction="none")


def token_losses(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of next-token prediction and the mask of target tokens, both [B, T-1]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    logits = logits[:, :-1, :]
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(targets.shape)
    return nll, (targets != IGNORE_INDEX)


def causal_lm_losses(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    nll, mask = token_losses(model, batch)
    return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


PER_RECORD_LOSS = {
    "classification": classification_losses,
    "causal_lm": causal_lm_losses,
}
