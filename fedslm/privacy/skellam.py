"""Distributed DP under secure aggregation: integer lattice, randomized rounding, Skellam noise.

Each institution scales its clipped gradient sum onto the integer lattice, rounds it with
:func:`randomized_round` and adds a share of symmetric Skellam noise (:func:`noise`). Secure
aggregation reveals only the integer sum, and Skellam is closed under addition, so the sum carries
Skellam noise of exactly the summed variance: one central mechanism, accounted here.

Sk(mu) = Poisson(mu/2) - Poisson(mu/2): ``mu`` is the per-coordinate variance. RDP (Agarwal, Kairouz,
Liu, "The Skellam Mechanism for Differentially Private Federated Learning", NeurIPS 2021, Theorem 3.5 /
Corollary 3.6), for integer alpha > 1 and L1 / L2 sensitivities Delta1 / Delta2 in lattice units:

    eps(alpha) <= alpha Delta2^2 / (2 mu) + min(((2 alpha - 1) Delta2^2 + 6 Delta1) / (4 mu^2), 3 Delta1 / (2 mu))

Releases compose by adding RDP; (eps, delta) comes from Opacus' RDP conversion (Balle et al. 2020).
A release is ``(mu, l1, l2, count)``: ``count`` releases of the sum with variance ``mu``.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

Release = tuple[float, float, float, int]

# Integer orders only: the bound is proved for integer alpha. Dense where optima usually lie, sparser
# up to 1024 for low-noise plans; a missing order only loosens the bound (never wrong, just worse).
ORDERS: tuple[int, ...] = (*range(2, 65), *range(72, 257, 8), *range(288, 1025, 32))

_LIMIT = float(2**52)  # randomized_round: below it floor(x) + 1 is exact and x has U-sized room
_REL_PRECISION = 1e-7  # calibrate's bisection stops when hi / lo - 1 falls below this


def rdp(mu: float, l1: float, l2: float, orders: Sequence[int] = ORDERS) -> np.ndarray:
    """RDP of one release at each order (Theorem 3.5); ∞ everywhere without noise."""
    a = np.asarray(orders, dtype=np.float64)
    if mu <= 0:
        return np.full(a.shape, np.inf)
    l2sq = float(l2) ** 2
    tail = np.minimum(((2 * a - 1) * l2sq + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))
    return a * l2sq / (2 * mu) + tail


def rdp_of(releases: Iterable[Release]) -> np.ndarray:
    """RDP at ORDERS of a composition: counts times one release's curve, summed."""
    total = np.zeros(len(ORDERS))
    for mu, l1, l2, count in releases:
        if count < 0:
            raise ValueError(f"a release count must be >= 0, got {count}")
        if count:  # skip, so that a zero count of a noiseless release is not 0 * inf
            total = total + count * rdp(mu, l1, l2)
    return total


def gaussian_rdp(noise_multiplier: float, sample_rate: float, steps: int) -> np.ndarray:
    """Opacus' (subsampled) Gaussian RDP at ORDERS, to pass as ``extra_rdp`` for one ledger."""
    return np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=list(ORDERS)),
                      dtype=np.float64)


def epsilon(releases: Iterable[Release], delta: float, *, extra_rdp: Optional[np.ndarray] = None) -> float:
    """ε at ``delta`` of the releases composed with ``extra_rdp`` (other mechanisms' RDP at ORDERS)."""
    releases = list(releases)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not releases and extra_rdp is None:
        return 0.0
    total = rdp_of(releases) + _extra(extra_rdp)
    if np.isnan(total).any():  # a corrupt entry (NaN variance or sensitivity) must never read as 0-DP
        return math.inf
    if not np.any(total > 0):  # nothing depends on the data: 0-DP, whatever the conversion's slack
        return 0.0
    return _eps(total, delta)


def _extra(extra_rdp: Optional[np.ndarray]) -> np.ndarray:
    if extra_rdp is None:
        return np.zeros(len(ORDERS))
    extra = np.asarray(extra_rdp, dtype=np.float64)
    if extra.shape != (len(ORDERS),):
        raise ValueError(f"extra_rdp must be an RDP curve at ORDERS, shape ({len(ORDERS)},), got {extra.shape}")
    return extra


def _eps(total_rdp: np.ndarray, delta: float) -> float:
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        # An optimum at the first or last order is still a valid bound (only a looser one).
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, _ = get_privacy_spent(orders=list(ORDERS), rdp=total_rdp, delta=delta)
    return max(0.0, float(eps))  # the conversion can dip below 0 at huge orders and large δ; ε >= 0 anyway


def lattice_sensitivity(norm: float, dim: int) -> tuple[float, float]:
    """(l1, l2) of the rounded sum's change when one record (L2 norm <= ``norm`` lattice units) comes or goes.

    Rounding adds sensitivity, so it must be accounted. Fix the uniforms U of :func:`randomized_round`:
    the institution's rounded sum moves from floor(a + U) to floor(a + d + U), ||d||_2 <= norm, and
    per coordinate floor(x) - floor(y) is floor(x - y) or ceil(x - y), so |diff_j| <= ceil|d_j| < |d_j| + 1.
    The triangle inequality gives ||diff||_2 <= norm + sqrt(dim), and Cauchy-Schwarz
    ||diff||_1 <= ||d||_1 + dim <= sqrt(dim) norm + dim. Other institutions' rounded values do not move.
    Coupling U across neighbouring datasets is legitimate: U is drawn independently of the data with
    the same law under both, so each output law is a mixture over U, and Rényi divergence is jointly
    quasi-convex (van Erven & Harremoës 2014): the bound for every fixed U bounds the mixtures.
    """
    if norm < 0 or dim < 1:
        raise ValueError(f"need norm >= 0 and dim >= 1, got norm={norm}, dim={dim}")
    root = math.sqrt(dim)
    return root * norm + dim, norm + root


def calibrate(
    target_epsilon: float, delta: float, rounds: int, l1: float, l2: float, *,
    prior: Sequence[Release] = (), extra_rdp: Optional[np.ndarray] = None,
) -> float:
    """Smallest total per-coordinate variance mu with which ``rounds`` more releases stay within ε.

    Bisection in log space (ε falls strictly as mu grows) to relative precision ~1e-7; the upper,
    safe end is returned, so the plan never overshoots ``target_epsilon``.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not (l1 > 0 and l2 > 0):
        raise ValueError(f"sensitivities l1 and l2 must be > 0, got l1={l1}, l2={l2}")
    base = rdp_of(prior) + _extra(extra_rdp)
    floor_eps = _eps(base, delta)  # the limit as mu -> inf
    if floor_eps >= target_epsilon:
        if np.any(base > 0):
            raise ValueError(f"prior (and extra_rdp) already spend eps={floor_eps:.4g} >= target_epsilon={target_epsilon}")
        raise ValueError(f"target_epsilon={target_epsilon} is below what the RDP orders can certify at delta={delta}")

    def fits(mu: float) -> bool:
        return _eps(base + rounds * rdp(mu, l1, l2), delta) <= target_epsilon

    lo = hi = 1.0
    if fits(hi):
        while fits(lo):  # terminates: as mu -> 0 the RDP, and ε, go to ∞
            hi, lo = lo, lo / 2
    else:
        while not fits(hi):  # terminates: as mu -> ∞ ε falls to floor_eps < target
            lo, hi = hi, hi * 2
    while hi > lo * (1 + _REL_PRECISION):
        mid = math.sqrt(lo * hi)
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def randomized_round(x: torch.Tensor, generator: Optional[torch.Generator] = None, *,
                     secure: bool = False) -> torch.Tensor:
    """floor(x + U), U uniform in [0, 1) per coordinate, as int64: unbiased, so the secure sum stays unbiased.

    U = k / 2**53 (k a uniform 53-bit integer) and the test x + U >= floor(x) + 1 is made with
    operations that are exact in float64 (Sterbenz), so the result is floor(x + U) in real arithmetic
    for every U: the rounding argument of :func:`lattice_sensitivity` holds exactly, not just w.h.p.
    Bias is below 2**-53; integral x comes back unchanged. ``secure``: U from the OS CSPRNG
    (:mod:`fedslm.privacy.csprng`) instead of ``generator``.
    """
    x = x.to(torch.float64)
    if not bool(torch.all(x.abs() < _LIMIT)):  # also rejects NaN / ∞
        raise ValueError("randomized_round needs finite values below 2**52 in magnitude")
    if secure:
        from fedslm.privacy import csprng

        k = torch.from_numpy(csprng.bits53(x.numel())).view(x.shape).to(x.device)
    else:
        k = torch.randint(0, 2**53, x.shape, generator=generator, dtype=torch.int64, device=x.device)
    u = k.to(torch.float64) * 2.0**-53
    base = torch.floor(x)
    # x + U >= base + 1, decided exactly: in [0, 1) as x >= 1 - U (1 - U exact on the 2**-53 grid),
    # elsewhere as U >= (base + 1) - x (exact there by Sterbenz' lemma).
    unit = (x >= 0) & (x < 1)
    up = torch.where(unit, (1.0 - u) <= x, u >= (base + 1.0) - x)
    return base.to(torch.int64) + up.to(torch.int64)


def noise(shape: Union[int, Sequence[int]], mu: float, generator: Optional[torch.Generator] = None, *,
          secure: bool = False) -> torch.Tensor:
    """Skellam(mu) integer noise, variance ``mu`` per coordinate: one institution's share of the sum's noise.

    Poisson draws on float64 rates are integers held exactly below 2**53, so even mu ~ 1e9 is exact.
    ``secure``: drawn by numpy's Poisson sampler on Philox keyed from the OS CSPRNG
    (:func:`fedslm.privacy.csprng.keyed_generator`) instead of ``generator``.
    """
    if mu < 0:
        raise ValueError(f"mu must be >= 0, got {mu}")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    device = generator.device if generator is not None else torch.device("cpu")
    if mu == 0:
        return torch.zeros(shape, dtype=torch.int64, device=device)
    if secure:
        from fedslm.privacy import csprng

        rng = csprng.keyed_generator()
        draws = rng.poisson(mu / 2, size=(2, *shape)).astype(np.int64)
        return torch.from_numpy(draws[0] - draws[1])
    rates = torch.full(shape, mu / 2, dtype=torch.float64, device=device)
    plus = torch.poisson(rates, generator=generator)
    minus = torch.poisson(rates, generator=generator)
    return plus.to(torch.int64) - minus.to(torch.int64)
