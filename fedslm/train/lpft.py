"""LP-FT (Kumar et al., ICLR 2022): a linear probe first, then LoRA fine-tuning from that probe.

With ``lora.from_round: R`` (and ``lora.layers: k`` ≥ 1) a run's rounds before R train the classifier head
alone on the cached sentence vectors (the probe: milliseconds a round), and from round R on LoRA on the top
k encoder layers trains over the frozen-prefix cache (:mod:`fedslm.train.prefix`). ``lora.train_head:
false`` leaves the head where the probe put it once LoRA trains: every clipped gradient is then LoRA's, and
no noise lands on the head.

Privacy is the plan's as in any run: every round takes the plan's steps at the node's planned σ, charged to
its ledger before it runs; which tensors a round trains changes what it releases, not what it costs.

A probe round reads the sentence vectors of the base encoder, which are the adapted model's only while the
LoRA products B·A are zero: LoRA's start (B = 0). A node therefore refuses a probe round whose global
adapter has a non-zero ``lora_B`` (:func:`check_probe_adapter`) before anything is charged: a coordinator
that moved LoRA early would have the node train a head on features its model does not compute.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Optional

import torch
from torch import nn

from fedslm.errors import FedslmError


class ProbeAdapterError(FedslmError):
    """A probe round's global adapter has moved LoRA (non-zero ``lora_B``)."""


def probe_round(from_round: Optional[int], round_idx: int) -> bool:
    """Whether round ``round_idx`` (1-based) trains the head alone under ``lora.from_round``."""
    return from_round is not None and round_idx < from_round


def round_layers(layers: Optional[int], from_round: Optional[int], round_idx: int) -> Optional[int]:
    """The frozen-prefix depth a round trains from: 0 (the head on sentence vectors) in a probe round, else
    ``lora.layers``."""
    return 0 if probe_round(from_round, round_idx) else layers


def check_probe_adapter(adapter: Optional[Mapping[str, torch.Tensor]], round_idx: int) -> None:
    """Refuse a probe round whose adapter carries a non-zero ``lora_B`` (see the module's docstring)."""
    for key, tensor in (adapter or {}).items():
        if "lora_B" in key and bool(torch.any(tensor != 0)):
            raise ProbeAdapterError(
                f"round {round_idx} is a probe round (lora.from_round), where the head trains alone on the base "
                f"encoder's sentence vectors, but the global adapter's {key} is not zero: LoRA has moved, so "
                "those vectors are not this model's; not training")


@contextlib.contextmanager
def head_frozen(model: nn.Module, frozen: bool) -> Iterator[None]:
    """The classifier head's trained copy untrained (``requires_grad`` off) inside, when ``frozen``; restored
    after (a simulated node's model serves the next round too)."""
    if not frozen:
        yield
        return
    from fedslm.lora.adapter import trained_head

    params = [p for p in trained_head(model).parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def freezes_head(train_head: bool, from_round: Optional[int], round_idx: int) -> bool:
    """Whether a round trains LoRA without the head (``lora.train_head: false`` past the probe rounds)."""
    return not train_head and not probe_round(from_round, round_idx)
