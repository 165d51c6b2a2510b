"""A public prior for the classifier head: each class's row is the base's embedding of its name.

The label names are public (every node agrees on them, ``data.labels``), so a head initialised
from them costs no privacy: row c is ``head_prior_scale`` times the unit-length pooled embedding
of label c's name under the frozen base, and the bias is 0. With normalised sentence vectors the
logits start as scaled cosine similarities between a record and each class name — a zero-shot
classifier the DP rounds then refine. The coordinator writes it into the first global adapter
(the head is part of the adapter), so every node starts from the same tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedslm.config.schema import ModelConfig
from fedslm.data.examples import ClassificationExample
from fedslm.errors import ConfigError


def trainable_head(model: nn.Module) -> nn.Linear:
    from fedslm.lora.adapter import trained_head

    head = trained_head(model)
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"needs a linear classifier head, this model's is a {type(head).__name__}")
    return head


@torch.no_grad()
def apply_label_prior(model: nn.Module, tokenizer, labels: Sequence[str], cfg: ModelConfig) -> None:
    """Set ``model``'s trainable head to the label-name prior (in place)."""
    from fedslm.data.tasks import ClassificationTask
    from fedslm.train.prefix import compute

    try:
        head = trainable_head(model)
    except ConfigError as exc:
        raise ConfigError(f"model.head_init 'label-names': {exc}") from None
    if head.weight.shape[0] != len(labels):
        raise ConfigError(f"model.head_init 'label-names': {len(labels)} labels for a {head.weight.shape[0]}-way head")
    enc = ClassificationTask().encode([ClassificationExample(str(name), i) for i, name in enumerate(labels)],
                                      tokenizer, cfg.max_length)
    names = compute(model, enc, 0).hidden
    head.weight.copy_(F.normalize(names, dim=-1) * cfg.head_prior_scale)
    if head.bias is not None:
        head.bias.zero_()
