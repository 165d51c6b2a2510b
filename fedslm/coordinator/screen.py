"""Checks on an institution's update before it may join the aggregate.

An update must carry exactly the adapter's keys, with the global adapter's
shapes, only finite values, and move the adapter by no more than a norm bound.
A reply that fails is rejected with a reason and the round goes on without it.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from fedslm.config import Config


def default_max_update_norm(cfg: Config, num_params: int) -> float:
    """A generous bound on how far honest local training can move the adapter in one round.

    AdamW moves each coordinate by about lr per step at most, SGD by lr times the (clipped, noised)
    gradient; 10x that over all local steps and coordinates is far above any honest update.
    """
    return 10.0 * cfg.train.lr * cfg.train.local_steps * math.sqrt(max(num_params, 1)) * max(
        1.0, cfg.privacy.max_grad_norm)


def check_update(global_state: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor],
                 max_norm: float) -> Optional[str]:
    """None if ``update`` may be aggregated, else the reason it may not."""
    missing = sorted(set(global_state) - set(update))
    unexpected = sorted(set(update) - set(global_state))
    if missing or unexpected:
        return (f"keys do not match the adapter (missing {missing[:2]}{'...' if len(missing) > 2 else ''}, "
                f"unexpected {unexpected[:2]}{'...' if len(unexpected) > 2 else ''})")
    sq = 0.0
    for key, ref in global_state.items():
        got = update[key]
        if tuple(got.shape) != tuple(ref.shape):
            return f"tensor {key} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if not got.is_floating_point():
            return f"tensor {key} has dtype {got.dtype}, expected floating point"
        if not bool(torch.isfinite(got).all()):
            return f"tensor {key} holds NaN or inf"
        sq += float(((got.double() - ref.double()) ** 2).sum())
    norm = math.sqrt(sq)
    if norm > max_norm:
        return f"update norm {norm:.3g} exceeds the bound {max_norm:.3g}"
    return None
