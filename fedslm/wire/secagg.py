"""Secure aggregation: Flower's SecAgg+ protocol under fedslm's rounds.

With ``federation.secure_aggregation=true`` a training round runs Flower's SecAgg+ (Bell et al.
2020) instead of collecting plain updates: nodes agree on pairwise masks, each sends its update
quantised and masked, and the coordinator can unmask only the weighted *sum*; a node that drops
out after sending is unmasked from its neighbours' secret shares, as long as ``threshold`` of them
answer. The protocol is Flower's own: the coordinator drives ``SecAggPlusWorkflow``'s four stages,
the node runs ``secaggplus_mod``. fedslm adds:

* a node sends its *update* (adapter minus the global one) rather than its adapter, so the
  quantisation range (``federation.secagg.clipping_range``) fits updates, which are small, and
  the coordinator adds the unmasked average back onto the global adapter;
* masks with the seed's full 256 bits: Flower 1.42's ``pseudo_rand_gen`` folds each 32-byte seed
  into a 32-bit numpy seed, so a coordinator could search 2**32 seeds to strip one node's
  private mask. :func:`mask_stream` expands the whole seed with SHAKE-256 and is installed on
  both sides (:func:`install_mask_stream`), so both ends always agree;
* coordinator-side checks on every masked vector (count, shapes, size) before it enters the sum;
  a malformed one counts as a dropout, with its node and reason in ``metrics.jsonl``;
* institution identities and a consistency stage (:mod:`fedslm.wire.identity`): nodes sign their
  round keys and, between Flower's collect and unmask stages (:data:`CONSISTENCY_STAGE`), the list
  of survivors, so that a coordinator can neither make up neighbours nor tell nodes different
  stories about who dropped out;
* every protocol failure is logged with its stage, node and reason; too few live nodes stop the
  run with the reason, like any other round.

The coordinator sees each node's metrics (loss, ε, record count) in plain text, as without
secure aggregation, and can no longer screen single updates: it checks only the average.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from typing import TYPE_CHECKING, Optional

import numpy as np

from fedslm.config import Config
# Re-exported: both ends read the levels and the modulus here, beside the rest of the protocol's layout.
from fedslm.config.secagg import MODULUS, quantization_range

if TYPE_CHECKING:
    from fedslm.privacy.distributed import Lattice

# The modules themselves (their packages re-export functions under the same names).
_mod_module = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
_workflow_module = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")

# fedslm's stage between Flower's collect-masked-vectors and unmask stages: every survivor signs the
# survivor list (fedslm.wire.identity.CONSISTENCY). Sent in the same record as Flower's stages.
CONSISTENCY_STAGE = "fedslm-consistency"
# The longest survivor list a node reads (a federation of institutions is far smaller).
MAX_SURVIVORS = 10_000


# --------------------------------------------------------------------------------------------
# Masks with the seed's full entropy


def mask_stream(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Uniform integers in [0, num_range) of the given shapes, expanded from all of ``seed``.

    SHAKE-256 over (seed, tensor index); ``num_range`` must be a power of two up to 2**32, which
    makes the reduction exact. Drop-in for Flower's ``pseudo_rand_gen``.
    """
    if num_range > MODULUS or num_range & (num_range - 1):
        raise ValueError(f"the mask range must be a power of two <= 2**32, got {num_range}")
    out = []
    for index, dims in enumerate(dimensions_list):
        count = int(np.prod(dims)) if len(dims) else 1
        raw = hashlib.shake_256(seed + index.to_bytes(4, "little")).digest(4 * count)
        values = (np.frombuffer(raw, dtype="<u4").astype(np.int64) & (num_range - 1))
        out.append(values.reshape(dims) if len(dims) else np.array(values[0], dtype=np.int64))
    return out


def install_mask_stream() -> None:
    """Make Flower's SecAgg+ node mod and coordinator workflow draw masks from :func:`mask_stream`."""
    _mod_module.pseudo_rand_gen = mask_stream
    _workflow_module.pseudo_rand_gen = mask_stream


install_mask_stream()


# --------------------------------------------------------------------------------------------
# Shared by both ends


def distributed_lattice(cfg: Config, honest: int = 1, max_epsilon_alone: Optional[float] = None) -> "Lattice":
    """The integer lattice of a distributed-noise round (``federation.secagg.distributed_noise``), as both ends
    derive it from the run config; ``honest`` and ``max_epsilon_alone`` are the node's trust (the coordinator
    decodes without them)."""
    from fedslm.privacy.distributed import Lattice

    sa = cfg.federation.secagg
    return Lattice(bits=sa.lattice_bits, honest=honest,
                   max_epsilon_alone=math.inf if max_epsilon_alone is None else float(max_epsilon_alone),
                   levels=quantization_range(cfg), clipping_range=float(sa.clipping_range))


def quantization_step(cfg: Config) -> float:
    return 2 * cfg.federation.secagg.clipping_range / quantization_range(cfg)


# On every reply of a secure round with the clipped bit in the sum: how many of the nodes in it were clipped.
CLIPPED_COUNT = "secagg-clipped-count"


def bit_in_sum(cfg: Config) -> bool:
    """Whether each node's clipped bit (adaptive client-side clipping, Andrew et al.) rides in the masked
    sum as one extra coordinate, so that the coordinator learns only how many nodes were clipped, never
    which: under SecAgg+ with adaptive client-side clipping. Both ends decide the layout from the run's
    config; every weight is 1 there (client-level DP), so the unmasked coordinate is the clipped share."""
    cl = cfg.privacy.client_level
    return bool(cfg.federation.secure_aggregation and cl.enabled and cl.clipping == "client" and cl.adaptive)


def bit_value(bit: int, clipping_range: float) -> np.ndarray:
    """The extra coordinate a node masks: its bit scaled to half the quantisation range (inside it, so
    never clipped; the coordinator divides the unmasked mean by the same factor)."""
    return np.array([float(bool(bit)) * clipping_range / 2], dtype=np.float64)


def max_weight(cfg: Config) -> float:
    """The weight bound both ends use: 1 under client-level DP (every institution counts once),
    else ``federation.secagg.max_weight`` training records."""
    return 1.0 if cfg.privacy.client_level.enabled else float(cfg.federation.secagg.max_weight)


