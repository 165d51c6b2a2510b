"""Clipping a whole update to an L2 bound (client-level DP), as both ends compute it."""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    return float(math.sqrt(sum(float((u.astype(np.float64) ** 2).sum()) for u in update.values())))


def clip_update(sent: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray],
                clipping_norm: float) -> tuple[dict[str, np.ndarray], float, bool]:
    """``sent + clip(values - sent)`` by key (FlatClip), the update's norm, and whether it was clipped."""
    update = {k: values[k].astype(np.float64) - sent[k].astype(np.float64) for k in sent}
    norm = update_norm(update)
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    clipped = {k: np.asarray(sent[k] + update[k] * scale, dtype=values[k].dtype) for k in sent}
    return clipped, norm, scale < 1.0
