"""The SecAgg+ values a run config implies (``federation.secagg``), which validation and both ends of the
protocol share.

They live beside the schema rather than in :mod:`fedslm.wire.secagg` (which re-exports them) so that the
config imports nothing of the protocol: the wire reads the config, never the other way round.
"""

from __future__ import annotations

from fedslm.config.schema import Config

# Mask values live in [0, 2**32): the protocol's modulus.
MODULUS = 2**32


def quantization_range(cfg: Config) -> int:
    """Levels over [-clipping_range, clipping_range]: as many as the 2**32 modulus allows for the
    federation's size (the sum of every institution's levels must not wrap), at most 2**30 (Flower
    rounds into int32)."""
    fixed = cfg.federation.secagg.quantization_range
    if fixed is not None:
        return int(fixed)
    bits = min(30, ((MODULUS - 1) // cfg.federation.num_clients).bit_length() - 1)
    return 2**bits
