"""ε of a DP-SGD history with Opacus' accountants (RDP or PRV).

A history is a list of ``(noise_multiplier, sample_rate, steps)`` — Opacus' own accountant history
format. Composition is commutative, so rounds of equal (σ, q) are merged wherever they stand.

What one evaluation may cost is bounded, whatever the history (a node computes ε while serving a
coordinator's request, which must not be able to pin it):

- RDP composes additively per order: ε comes from the sum of each distinct (σ, q)'s per-step curve
  times its steps (:func:`rdp_curve`), so ε after r rounds of one plan is r times one curve, not r
  compositions. The node's ledger keeps the running sum (fedslm.privacy.ledger), so a round's check
  costs the same however long the ledger is;
- PRV discretises the whole composition on one grid whose size grows with the square root of the
  total steps (Opacus: mesh ∝ 1/√steps), and holds one grid per distinct (σ, q). Past
  :data:`MAX_PRV_POINTS` grid points or :data:`MAX_PRV_MECHANISMS` distinct (σ, q), a history is
  composed with RDP instead (:func:`prv_fallback` says why): RDP is a sound upper bound of the same
  steps, only looser, so a cap enforced with it still holds. Without this bound 10**7 steps (1000
  rounds of 10,000 local steps) need a grid of 2·10**9 points: the process dies while planning.
  A history of full-batch steps only (q = 1) needs no grid: its composition is a Gaussian mechanism
  whose ε is exact in closed form (:mod:`fedslm.privacy.gaussian`), PRV's figure less its error bound.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from typing import Iterable, Optional, Sequence

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis

Step = tuple[float, float, int]

log = logging.getLogger("fedslm.privacy")

# Opacus' orders plus larger ones: short, low-noise plans (few local steps) have their
# optimum above 63, and a missing order only loosens the bound (never wrong, just worse).
RDP_ALPHAS = [*RDPAccountant.DEFAULT_ALPHAS, 80, 96, 128, 192, 256, 384, 512, 1024]

# PRV's grid: about 170 bytes and a few hundred ns a point (measured on 2 cores: 7.5·10**6 points, the
# grid of 10**5 steps at q=0.01, took 7 s and 1.3 GB), times one discretised grid per distinct (σ, q).
MAX_PRV_POINTS = 2_000_000
MAX_PRV_MECHANISMS = 8
# Opacus' PRV defaults (PRVAccountant.get_epsilon), which the grid estimate below follows.
PRV_EPS_ERROR = 0.01


def accountant_kwargs(accountant: str) -> dict:
    return {"alphas": RDP_ALPHAS} if accountant == "rdp" else {}


def rdp_curve(noise_multiplier: float, sample_rate: float, steps: int,
              orders: Sequence[float] = tuple(RDP_ALPHAS)) -> np.ndarray:
    """RDP of ``steps`` subsampled Gaussian steps at ``orders`` (∞ everywhere for σ = 0, q > 0)."""
    if steps <= 0 or sample_rate <= 0:
        return np.zeros(len(orders))
    if noise_multiplier <= 0:
        return np.full(len(orders), np.inf)
    return np.asarray(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=int(steps),
                                  orders=list(orders)), dtype=float)


def epsilon_from_rdp(curve: np.ndarray, delta: float, orders: Sequence[float] = tuple(RDP_ALPHAS)) -> float:
    """ε at ``delta`` of an RDP curve at ``orders`` (Opacus' conversion, as its RDP accountant does)."""
    curve = np.asarray(curve, dtype=float)
    if not curve.any():
        return 0.0
    if np.isinf(curve).all():
        return math.inf
    with warnings.catch_warnings():  # "optimal order is the largest alpha": only a looser bound
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=curve, delta=delta)
    return float(eps)


def merge(history: Iterable[Step]) -> list[Step]:
    """One entry per distinct (σ, q) with its steps summed, in order of first appearance."""
    out: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        if steps <= 0:
            continue
        key = (float(sigma), float(q))
        out[key] = out.get(key, 0) + int(steps)
    return [(s, q, n) for (s, q), n in out.items()]


def prv_fallback(history: Sequence[Step], delta: float) -> Optional[str]:
    """Why PRV would cost too much for ``history`` (merged), or None: it may run."""
    return _prv_fallback(tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta))


@functools.lru_cache(maxsize=512)  # a pure function; sizing PRV's domain integrates (see _composed)
def _prv_fallback(history: tuple[Step, ...], delta: float) -> Optional[str]:
    active = [(s, q, n) for s, q, n in history if q > 0 and n > 0]
    if all(q == 1.0 for _, q, _ in active):
        return None  # full batch only: the exact Gaussian composition, no grid (fedslm.privacy.gaussian)
    if len(active) > MAX_PRV_MECHANISMS:
        return f"{len(active)} distinct (σ, q) in the history, more than {MAX_PRV_MECHANISMS}"
    if not active or any(s <= 0 for s, _, _ in active):
        return None  # nothing to compose, or ε = ∞: no grid is built
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

    delta_error = delta / 1000
    total = sum(n for _, _, n in active)
    with warnings.catch_warnings(), np.errstate(divide="ignore", over="ignore"):
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        half_width = compute_safe_domain_size([PoissonSubsampledGaussianPRV(q, s) for s, q, _ in active],
                                              [n for _, _, n in active], PRV_EPS_ERROR, delta_error)
    points = 2 * half_width / (PRV_EPS_ERROR / math.sqrt(total * math.log(12 / delta_error) / 2))
    if not points * len(active) <= MAX_PRV_POINTS:
        return (f"its grid would hold {points:.3g} points for {total} steps ({len(active)} distinct (σ, q)), more "
                f"than {MAX_PRV_POINTS}")
    return None


def epsilon(history: Iterable[Step], delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` after every step in ``history``; ∞ if any step had no noise. With ``prv``, a history
    past PRV's bounds (:func:`prv_fallback`) is composed with RDP, a looser upper bound of the same steps."""
    merged = tuple((float(s), float(q), int(n)) for s, q, n in merge(history) if q > 0)
    return _composed(merged, float(delta), accountant)


# A pure function of (merged steps, δ, accountant). PRV's composition builds a grid and integrates (tens of
# ms to seconds); a node asks for the same history several times a round (the cap before and after the
# planned round, the figure it reports), and a simulation's process serves every round of its institutions.
@functools.lru_cache(maxsize=512)
def _composed(merged: tuple[Step, ...], delta: float, accountant: str) -> float:
    if not merged:
        return 0.0
    if any(not sigma > 0 for sigma, _, _ in merged):  # no noise, or not a number (never ε = 0)
        return math.inf
    if accountant == "prv" and all(q == 1.0 for _, q, _ in merged):
        # Full-batch steps are Gaussian mechanisms: their composition has an exact ε, the one PRV
        # approximates from above (fedslm.privacy.gaussian).
        from fedslm.privacy import gaussian

        return gaussian.epsilon(gaussian.mu([(s, n) for s, _, n in merged]), delta)
    if accountant == "prv":
        reason = prv_fallback(merged, delta)
        if reason is None:
            acc = create_accountant(mechanism="prv")
            acc.history = [(float(s), float(q), int(n)) for s, q, n in merged]
            with np.errstate(divide="ignore"), warnings.catch_warnings():  # PRV at q = 1: log(1 - q) = -inf
                # PRV sizes its discretisation domain from an RDP bound on Opacus' default orders; at large σ
                # that bound's optimum lies past them, which only widens the domain (the ε is PRV's own).
                warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
                return float(acc.get_epsilon(delta=delta))
        log.info("composing with RDP instead of PRV (a looser upper bound): %s", reason)
    return epsilon_from_rdp(sum(rdp_curve(s, q, n) for s, q, n in merged), delta)


def epsilon_per_round(
    noise_multiplier: float, sample_rate: float, steps_per_round: int, rounds: int, delta: float,
    accountant: str = "rdp", prior: Sequence[Step] = (),
) -> list[float]:
    """ε reached after each of ``rounds`` rounds, on top of a ``prior`` history. With RDP one curve per
    distinct (σ, q) is computed once and scaled per round (a conversion per round, no composition)."""
    if accountant != "rdp":
        return [epsilon([*prior, (noise_multiplier, sample_rate, steps_per_round * r)], delta, accountant)
                for r in range(1, rounds + 1)]
    merged = [(s, q, n) for s, q, n in merge(prior) if q > 0]
    if any(s <= 0 for s, _, _ in merged) or (noise_multiplier <= 0 < sample_rate and steps_per_round > 0):
        return [math.inf] * rounds
    base = sum((rdp_curve(s, q, n) for s, q, n in merged), start=np.zeros(len(RDP_ALPHAS)))
    one = rdp_curve(noise_multiplier, sample_rate, steps_per_round)
    return [epsilon_from_rdp(base + r * one, delta) for r in range(1, rounds + 1)]
