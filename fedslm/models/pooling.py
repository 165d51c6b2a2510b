"""Masked mean pooling for encoder classifiers (``model.pooling: mean``).

Hugging Face's BERT-family classifiers read the ``[CLS]`` vector through a
``pooler`` (dense + tanh) trained for next-sentence prediction. Sentence
encoders such as all-MiniLM-L6-v2 were instead trained so that the *mean* of
their token vectors is the sentence embedding; a linear head on that mean
separates ICD-10 chapters far better than one on the pooler (see
benchmarks/results/levers.md), which matters most under DP, where every
step is expensive.

:func:`use_mean_pooling` swaps the encoder's pooler for :class:`MaskedMeanPooler`
(no parameters, so nothing changes in the adapter state or in Opacus). The
pooler only receives the hidden states, so a forward pre-hook on the
classifier hands it the batch's ``attention_mask``; padding never enters
the mean.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from fedslm.errors import ModelError


class MaskedMeanPooler(nn.Module):
    """Mean of the token vectors where ``attention_mask`` is 1 (all tokens when no mask is given)."""

    def __init__(self, normalize: bool = False) -> None:
        super().__init__()
        self.mask: Optional[torch.Tensor] = None
        self.normalize = normalize

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        pooled = self._mean(hidden_states)
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def _mean(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask is None:
            return hidden_states.mean(dim=1)
        if mask.shape != hidden_states.shape[:2]:
            raise ModelError(f"mean pooling: attention_mask {tuple(mask.shape)} does not match the hidden states "
                             f"{tuple(hidden_states.shape[:2])}")
        w = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)


def use_mean_pooling(model: nn.Module, normalize: bool = False) -> None:
    """Replace ``model``'s encoder pooler with :class:`MaskedMeanPooler` (in place); ``normalize``:
    then divided by its L2 norm."""
    encoder = getattr(model, "base_model", None)
    if encoder is None or not hasattr(encoder, "pooler"):
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ModelError(f"model.pooling 'mean' needs an encoder classifier with a pooler (BERT family); "
                         f"'{kind}' has none (use model.pooling: cls)")
    pooler = MaskedMeanPooler(normalize)
    encoder.pooler = pooler

    def take_mask(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:  # forward(input_ids, attention_mask, ...)
            mask = args[1]
        pooler.mask = mask

    def drop_mask(*_: Any) -> None:
        pooler.mask = None

    model.register_forward_pre_hook(take_mask, with_kwargs=True)
    model.register_forward_hook(drop_mask)
