"""The exact ε of full-batch Gaussian rounds: what PRV approximates, in closed form.

A step that sums every record's clipped gradient (sample rate q = 1) and adds N(0, σ²C²) is the
Gaussian mechanism with sensitivity C. Composing n_i such steps at σ_i is again a Gaussian mechanism,
with μ = √(Σ n_i / σ_i²) (Dong, Roth and Su 2019, μ-GDP: composition adds μ² exactly), and its exact
(ε, δ) curve is (Balle and Wang 2018, Theorem 8)

    δ(ε) = Φ(μ/2 − ε/μ) − e^ε Φ(−μ/2 − ε/μ).

This is the privacy loss distribution PRV discretises (Gopi et al. 2021), so PRV's figure for such a
history is this ε plus its error bound (0.01 here), at ~10–200 ms a call growing with the steps;
solving the curve takes well under a millisecond at any length. fedslm's ``prv`` accountant uses it for
histories of q = 1 steps only (the head-only full-batch recipe); sampled steps go to PRV.
"""

from __future__ import annotations

import math

from scipy.optimize import brentq
from scipy.special import log_ndtr


def delta(eps: float, mu: float) -> float:
    """δ(ε) of the Gaussian mechanism of ``mu`` = sensitivity / noise standard deviation."""
    if mu <= 0:
        return 0.0
    a, b = mu / 2 - eps / mu, -mu / 2 - eps / mu
    return max(0.0, math.exp(log_ndtr(a)) - math.exp(eps + log_ndtr(b)))


def mu(steps: list[tuple[float, int]]) -> float:
    """μ of ``steps`` as (σ, count): σ is the noise multiplier (noise std / clipping norm)."""
    return math.sqrt(sum(n / (s * s) for s, n in steps))


def epsilon(mu_: float, target_delta: float) -> float:
    """The smallest ε with δ(ε) ≤ ``target_delta``, rounded up: a guarantee, never below the exact value."""
    if not 0 < target_delta < 1:
        raise ValueError(f"δ must be in (0, 1), got {target_delta}")
    if not (math.isfinite(mu_) and mu_ >= 0):  # a step with no noise (σ = 0) or not a number: no guarantee
        return math.inf
    if delta(0.0, mu_) <= target_delta:
        return 0.0
    hi = 1.0
    while delta(hi, mu_) > target_delta:  # δ(ε) falls to 0 as ε grows: bracket the root
        hi *= 2
        if hi > 1e6:
            return math.inf
    eps = brentq(lambda e: delta(e, mu_) - target_delta, 0.0, hi, xtol=1e-12, rtol=1e-12)
    while delta(eps, mu_) > target_delta:  # the root's float on the safe side
        eps = math.nextafter(eps, math.inf) if eps > 0 else 1e-300
        eps += 1e-12 * max(1.0, eps)
    return eps


def noise_multiplier(target_epsilon: float, target_delta: float, steps: int) -> float:
    """σ such that ``steps`` full-batch Gaussian steps at σ reach exactly ``target_epsilon`` (never above)."""
    lo_mu, hi_mu = 1e-9, 1.0
    while epsilon(hi_mu, target_delta) < target_epsilon:
        hi_mu *= 2
        if hi_mu > 1e6:
            raise ValueError(f"ε = {target_epsilon} at δ = {target_delta} is beyond any Gaussian noise")
    mu_ = brentq(lambda m: epsilon(m, target_delta) - target_epsilon, lo_mu, hi_mu, xtol=1e-13, rtol=1e-12)
    sigma = math.sqrt(steps) / mu_
    while epsilon(math.sqrt(steps) / sigma, target_delta) > target_epsilon:  # more noise, never less
        sigma *= 1 + 1e-12
    return sigma
