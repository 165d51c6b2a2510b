"""A node's side of client-side clipping (client-level DP): clip the update to the bound the coordinator sent.

The node checks that the coordinator sends a bound exactly when the run asks for client-side
clipping, so neither side silently skips it.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from fedslm.errors import FedslmError
from fedslm.privacy.clipping import clip_update


class ClippingMismatch(FedslmError):
    pass


def check_clipping(wanted: bool, config_norm: Optional[float]) -> None:
    """Refuse a bound the run does not ask for, a missing one, or one that is not > 0."""
    if wanted != (config_norm is not None):
        raise ClippingMismatch(
            "privacy.client_level.clipping=client in the run config, but the coordinator sent no clipping bound"
            if wanted else "the coordinator sent a clipping bound, but the run config does not ask for "
                           "client-side clipping (privacy.client_level.clipping=client)")
    if wanted and not config_norm > 0:  # type: ignore[operator]
        raise ClippingMismatch(f"the coordinator's clipping bound must be > 0, got {config_norm}")


def client_clip(wanted: bool, config_norm: Optional[float], sent: Mapping[str, np.ndarray],
                values: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``values`` clipped to ``config_norm`` around ``sent`` when ``wanted`` (the run's
    privacy.client_level.clipping=client), and the metrics that go with it."""
    check_clipping(wanted, config_norm)
    if not wanted:
        return dict(values), {}
    clipped, norm, was = clip_update(sent, values, float(config_norm))  # type: ignore[arg-type]
    return clipped, {KEY_NORM_BIT: int(was), "update-norm": norm}
