"""Distributed DP under SecAgg+: each node adds a share of integer noise on the protocol's lattice.

With local DP every node noises its own gradient sum for the guarantee it gives alone, so the
coordinator's sum of five nodes carries √5 times the noise of one centralized step. Under secure
aggregation the coordinator sees only the sum; if a node can count on ``honest`` contributors
(itself among them) adding their share, each needs only 1/honest of the variance for the same ε
of the *sum*. That is a trust assumption, so it is the node's own choice (its policy's
``privacy.assume_honest``; 1, the default, trusts no one and adds all the noise itself), and the
node caps both figures: the ε of the sum under that assumption (its usual cap) and the ε of its own
release were the others to add nothing (``max_epsilon_alone``).

Done soundly, the noise must sum exactly through SecAgg+'s modular integer arithmetic, which
float Gaussian noise quantised per node does not. Here (Agarwal, Kairouz & Liu, NeurIPS 2021, the
Skellam mechanism, :mod:`fedslm.privacy.skellam`):

* a node scales its clipped gradient sum so that the clip norm C spans ``2**bits`` lattice units,
  rounds it at random (floor(x + U), unbiased), and adds Skellam noise of variance
  ``mu_sum / honest`` per coordinate: an integer vector K;
* a sum of Skellams is Skellam, so the unmasked ΣK carries exactly Skellam(mu_sum) when ``honest``
  of its terms are honest; the RDP bound charges the rounding (l2 ≤ 2**bits + √d);
* K travels as the float K·(2R/T), which Flower's quantiser maps exactly onto its level K + T/2
  when R and T are powers of two; the node proves before training that no coordinate can leave
  [-T/2, T/2] (its record count times 2**bits, plus a noise tail no draw reaches), so Flower's
  clipping never changes a value and the modular sum is exact;
* the coordinator rounds the unmasked mean back to ΣK and steps by -lr·ΣK / (γ·N), γ = 2**bits / C,
  N the contributors' records: the federated full-batch step, now with one sum's noise.

Only the head-only full-batch recipe fits (one noised sum per round is the whole release): the
config refuses anything else (:func:`fedslm.config.load.validate`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from fedslm.errors import ConfigError, DataError
from fedslm.privacy import skellam

# A Skellam draw past this many standard deviations (plus this many units) never happens in practice
# (probability below 1e-80 per coordinate); the range check budgets for it.
_TAIL_SDS = 40.0
# Over the clip bound C in the sensitivity: a clipped record's norm can pass C by a few ulps (the clip
# factor is computed in float64 from the vectors that are summed).
_CLIP_SLACK = 1e-9
# Largest per-node variance drawn: the Poisson samplers are exact far below their float limits.
_MAX_MU = float(2**40)


@dataclass(frozen=True)
class Lattice:
    """The integer lattice of one distributed-noise round, and this node's trust in it."""

    # A clipped record's gradient spans 2**bits lattice units: γ = 2**bits / max_grad_norm.
    bits: int
    # Contributors whose noise this node counts on in the sum, itself included (1: none but itself).
    honest: int
    # Cap on the ε of this node's own releases alone (were every other contributor to add nothing).
    max_epsilon_alone: float
    # SecAgg+'s quantisation levels T and range R: one lattice unit is 2R / T on the wire.
    levels: int
    clipping_range: float

    @property
    def wire_step(self) -> float:
        return 2.0 * self.clipping_range / self.levels

    def scale(self, max_grad_norm: float) -> float:
        """γ: lattice units per unit of gradient sum."""
        return 2.0 ** self.bits / max_grad_norm

    def digest(self, max_grad_norm: float, layout: list[tuple[str, tuple[int, ...]]]) -> str:
        """What makes two nodes' noise the same noise: γ, SecAgg+'s levels and which tensors (by adapter key and
        shape) carry it. Signed with each node's share, so that a node counts only shares added on its own
        lattice and coordinates (a coordinator sending nodes different lattice_bits, clip norms, ranges or a
        trained bias would otherwise shrink their noise in this node's units, or leave some coordinates
        with this node's noise alone)."""
        import hashlib

        text = (f"bits={self.bits};clip={float(max_grad_norm)!r};R={float(self.clipping_range)!r};T={int(self.levels)};"
                + ";".join(f"{k}:{'x'.join(str(int(d)) for d in shape)}" for k, shape in sorted(layout)))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Share:
    """One round's noise: the sum's variance per coordinate, this node's part, and the sensitivities."""

    mu_sum: float
    mu_node: float
    l1: float
    l2: float

    @property
    def noise_multiplier(self) -> float:
        """The sum's noise in Gaussian terms (std / L2 sensitivity), for display."""
        return math.sqrt(self.mu_sum) / self.l2


def _power_of_two(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5


def check_wire(levels: int, clipping_range: float) -> None:
    """K·(2R/T) is quantised exactly onto K + T/2 only when R and T are powers of two (R within 2**±20,
    so that the unit 2R/T is a normal float64 and K·2R/T is exact)."""
    if not _power_of_two(float(levels)):
        raise ConfigError(f"federation.secagg.quantization_range must be a power of two under distributed noise, "
                          f"got {levels}")
    if not _power_of_two(float(clipping_range)) or not 2.0**-20 <= clipping_range <= 2.0**20:
        raise ConfigError(f"federation.secagg.clipping_range must be a power of two in [2**-20, 2**20] under "
                          f"distributed noise (Flower's quantiser then maps the lattice exactly), got {clipping_range}")


@functools.lru_cache(maxsize=64)  # a pure function of its arguments; the node plans every round
def plan_share(*, bits: int, honest: int, dim: int, target_epsilon: float, delta: float, rounds: int) -> Share:
    """Skellam variance for the sum such that ``rounds`` releases reach ``target_epsilon`` at ``delta``."""
    if honest < 1:
        raise ConfigError(f"privacy.distributed.honest must be >= 1, got {honest}")
    l1, l2 = skellam.lattice_sensitivity(2.0 ** bits * (1 + _CLIP_SLACK), dim)
    mu_sum = skellam.calibrate(target_epsilon, delta, rounds, l1, l2)
    return Share(mu_sum=mu_sum, mu_node=mu_sum / honest, l1=l1, l2=l2)


def check_range(lattice: Lattice, num_examples: int, mu_node: float) -> None:
    """Refuse, before anything is charged, a round whose lattice values could leave SecAgg+'s range.

    Worst case per coordinate: every record's clipped gradient (norm ≤ C, so each coordinate ≤ C)
    pointing one way, n·2**bits, plus rounding (1) and a noise tail of 40 standard deviations.
    The bound uses the record count only, so a refusal says nothing the count does not."""
    if mu_node > _MAX_MU:
        raise DataError(f"distributed noise: a noise variance of {mu_node:.3g} lattice units² is past what the Poisson "
                        f"samplers draw exactly (2**40); lower federation.secagg.lattice_bits")
    worst = num_examples * 2.0 ** lattice.bits * (1 + _CLIP_SLACK) + 1 + _TAIL_SDS * (math.sqrt(mu_node) + 1)
    if worst > lattice.levels // 2:
        fit = int(math.floor(math.log2(max((lattice.levels // 2 - 1 - _TAIL_SDS * (math.sqrt(mu_node) + 1))
                                           / num_examples, 1.0))))
        raise DataError(
            f"distributed noise: {num_examples} training records × 2**{lattice.bits} lattice units could exceed "
            f"SecAgg+'s range of ±{lattice.levels // 2}; lower federation.secagg.lattice_bits to {fit} or less")


def lattice_sum(sums: list[torch.Tensor], gamma: float, mu_node: float,
                generator: Optional[torch.Generator], *, secure: bool = False) -> list[torch.Tensor]:
    """K = round(γ·s) + Skellam(mu_node) per tensor (int64), s the clipped gradient sums (float64);
    ``secure``: the rounding and the noise from the OS CSPRNG (:mod:`fedslm.privacy.skellam`)."""
    out = []
    for s in sums:
        k = skellam.randomized_round(s.double() * gamma, generator, secure=secure)
        out.append(k + skellam.noise(tuple(s.shape), mu_node, generator, secure=secure))
    return out


def check_in_range(lattice: Lattice, values: list[torch.Tensor]) -> None:
    """A last check on the drawn K (unreachable when :func:`check_range` passed)."""
    half = lattice.levels // 2
    if any(int(v.abs().max()) > half for v in values if v.numel()):
        raise DataError("distributed noise: a lattice value left SecAgg+'s range; nothing is sent")


def to_wire(values: torch.Tensor, lattice: Lattice) -> np.ndarray:
    """K as the float Flower's quantiser maps exactly onto level K + T/2."""
    return values.to(torch.int64).numpy().astype(np.float64) * lattice.wire_step


def from_wire(average: np.ndarray, contributors: int, lattice: Lattice) -> np.ndarray:
    """ΣK from the unmasked mean of ``contributors`` nodes' K·(2R/T) (rounded: the mean's float error)."""
    return np.rint(np.asarray(average, dtype=np.float64) * contributors / lattice.wire_step).astype(np.int64)


def decoded_update(total: np.ndarray, lattice: Lattice, *, max_grad_norm: float, lr: float,
                   num_examples: int) -> np.ndarray:
    """The federation's full-batch step from ΣK: -lr · ΣK / (γ · N)."""
    return -lr * total.astype(np.float64) / (lattice.scale(max_grad_norm) * num_examples)
