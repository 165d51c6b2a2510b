"""Skellam distributed DP: the RDP bound against exact divergences, accounting, calibration, rounding, noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy import stats
from scipy.special import logsumexp

from fedslm.privacy import skellam
from fedslm.privacy.skellam import (
    ORDERS, calibrate, epsilon, gaussian_rdp, lattice_sensitivity, noise, randomized_round, rdp, rdp_of,
)


def _exact_renyi(mu: float, shift: int, alpha: int, *, forward: bool = True) -> float:
    """D_alpha(Sk(mu) + shift || Sk(mu)) (or the reverse), summing the pmf over a wide integer range."""
    half = mu / 2
    reach = int(shift * (alpha + 2) + 60 * math.sqrt(mu) + 200)
    k = np.arange(-reach, reach + 1)
    shifted, plain = stats.skellam.logpmf(k - shift, half, half), stats.skellam.logpmf(k, half, half)
    log_p, log_q = (shifted, plain) if forward else (plain, shifted)
    assert math.isclose(np.exp(logsumexp(log_p[np.isfinite(log_p)])), 1.0, rel_tol=1e-9)  # range holds the mass
    ok = np.isfinite(log_p) & np.isfinite(log_q)
    return float(logsumexp(alpha * log_p[ok] + (1 - alpha) * log_q[ok]) / (alpha - 1))


def _at(order: int, curve: np.ndarray) -> float:
    return float(curve[ORDERS.index(order)])


@pytest.mark.parametrize("mu", [4.0, 50.0, 1000.0])
@pytest.mark.parametrize("shift", [1, 3])
def test_bound_dominates_exact_renyi_divergence_of_shifted_skellam(mu, shift):
    bound = rdp(mu, shift, shift)
    for alpha in (2, 5, 20):
        for forward in (True, False):
            exact = _exact_renyi(mu, shift, alpha, forward=forward)
            assert 0 < exact <= _at(alpha, bound), (mu, shift, alpha, forward)


def test_bound_is_tight_for_large_mu():
    exact = _exact_renyi(1000.0, 1, 5)
    assert _at(5, rdp(1000.0, 1, 1)) / exact < 1.5
    assert _at(5, rdp(1000.0, 1, 1)) / _exact_renyi(1000.0, 1, 5, forward=False) < 1.5


def test_bound_formula_at_hand_computed_points():
    # mu=4, Delta1=Delta2=3: alpha=2 takes the 1/mu^2 branch, alpha=20 the 3 Delta1/(2 mu) branch.
    assert _at(2, rdp(4.0, 3, 3)) == pytest.approx(2 * 9 / 8 + (3 * 9 + 18) / 64, rel=1e-14)
    assert _at(20, rdp(4.0, 3, 3)) == pytest.approx(20 * 9 / 8 + 9 / 8, rel=1e-14)
    assert _at(7, rdp(1e4, 50.0, 5.0)) == pytest.approx(7 * 25 / 2e4 + (13 * 25 + 300) / 4e8, rel=1e-14)


def test_no_noise_is_infinite_rdp():
    assert np.all(np.isinf(rdp(0.0, 1, 1))) and np.all(np.isinf(rdp(-1.0, 1, 1)))


def test_large_mu_approaches_gaussian_rdp():
    l1, l2, mu = 9.0, 3.0, 1e6
    gauss = np.asarray(ORDERS, dtype=float) * l2**2 / (2 * mu)
    got = rdp(mu, l1, l2)
    assert np.all(got >= gauss)
    assert np.max((got - gauss) / gauss) < 1e-3


def test_epsilon_is_opacus_conversion_of_summed_curve():
    releases = [(400.0, 10.0, 3.0, 5), (900.0, 12.0, 4.0, 7)]
    summed = 5 * rdp(400.0, 10.0, 3.0) + 7 * rdp(900.0, 12.0, 4.0)
    np.testing.assert_allclose(rdp_of(releases), summed, rtol=1e-15)
    want, _ = get_privacy_spent(orders=list(ORDERS), rdp=summed, delta=1e-5)
    assert epsilon(releases, 1e-5) == pytest.approx(float(want), rel=1e-12)


def test_epsilon_adds_extra_rdp():
    releases = [(400.0, 10.0, 3.0, 5)]
    extra = gaussian_rdp(1.2, 0.05, 300)
    np.testing.assert_allclose(extra, compute_rdp(q=0.05, noise_multiplier=1.2, steps=300, orders=list(ORDERS)))
    want, _ = get_privacy_spent(orders=list(ORDERS), rdp=rdp_of(releases) + extra, delta=1e-5)
    got = epsilon(releases, 1e-5, extra_rdp=extra)
    assert got == pytest.approx(float(want), rel=1e-12)
    assert got > epsilon(releases, 1e-5) and got > epsilon([], 1e-5, extra_rdp=extra)
    with pytest.raises(ValueError, match="extra_rdp"):
        epsilon(releases, 1e-5, extra_rdp=extra[:-1])


def test_epsilon_limits_and_monotone_in_rounds():
    assert epsilon([], 1e-5) == 0.0
    assert epsilon([(1e30, 10.0, 3.0, 10)], 1e-5) < 1e-2
    assert math.isinf(epsilon([(0.0, 10.0, 3.0, 1)], 1e-5))
    eps = [epsilon([(1e4, 40.0, 5.0, r)], 1e-5) for r in range(1, 8)]
    assert all(a < b for a, b in zip(eps, eps[1:]))


L1, L2 = lattice_sensitivity(100.0, 1000)


def test_calibrate_reaches_target_and_is_tight():
    mu = calibrate(2.0, 1e-5, 20, L1, L2)
    assert epsilon([(mu, L1, L2, 20)], 1e-5) <= 2.0
    assert epsilon([(mu * (1 - 1e-4), L1, L2, 20)], 1e-5) > 2.0


@pytest.mark.parametrize("kwargs, name", [
    ({"target_epsilon": 0.0}, "target_epsilon"), ({"target_epsilon": -1.0}, "target_epsilon"),
    ({"delta": 0.0}, "delta"), ({"delta": 1.0}, "delta"), ({"delta": 1.5}, "delta"),
    ({"rounds": 0}, "rounds"), ({"prior": [(1.0, L1, L2, 1)]}, "prior"),
])
def test_calibrate_rejects_bad_inputs_by_name(kwargs, name):
    args = {"target_epsilon": 2.0, "delta": 1e-5, "rounds": 20, "l1": L1, "l2": L2, **kwargs}
    with pytest.raises(ValueError, match=name):
        calibrate(**args)


def test_calibrate_with_prior_needs_more_noise():
    prior = [(calibrate(2.0, 1e-5, 10, L1, L2), L1, L2, 10)]  # half the budget's worth already spent
    alone, after = calibrate(2.0, 1e-5, 10, L1, L2), calibrate(2.0, 1e-5, 10, L1, L2, prior=prior)
    assert after > alone
    assert epsilon([*prior, (after, L1, L2, 10)], 1e-5) <= 2.0
    extra = gaussian_rdp(1.0, 0.01, 500)
    assert calibrate(2.0, 1e-5, 10, L1, L2, extra_rdp=extra) > alone


def _gaussian_sigma(target: float, delta: float, rounds: int) -> float:
    def eps(sigma: float) -> float:
        curve = compute_rdp(q=1.0, noise_multiplier=sigma, steps=rounds, orders=list(ORDERS))
        return float(get_privacy_spent(orders=list(ORDERS), rdp=curve, delta=delta)[0])

    lo, hi = 1e-3, 1e3
    while hi / lo > 1 + 1e-9:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps(mid) <= target else (mid, hi)
    return hi


@pytest.mark.filterwarnings("ignore:Optimal order")
@pytest.mark.parametrize("target, rounds", [(1.0, 10), (4.0, 100)])
def test_large_lattice_matches_gaussian_noise_multiplier(target, rounds):
    l1, l2 = lattice_sensitivity(2.0**14, 8448)
    ratio = math.sqrt(calibrate(target, 1e-5, rounds, l1, l2)) / l2 / _gaussian_sigma(target, 1e-5, rounds)
    assert 1 - 1e-6 <= ratio < 1.01


def test_lattice_sensitivity_bounds_rounded_difference():
    dim, norm, trials = 50, 7.3, 4000
    l1, l2 = lattice_sensitivity(norm, dim)
    g = torch.Generator().manual_seed(1234)
    a = torch.randn(trials, dim, generator=g, dtype=torch.float64) * 30
    d = torch.randn(trials, dim, generator=g, dtype=torch.float64)
    scale = torch.rand(trials, 1, generator=g, dtype=torch.float64) * norm  # norms in [0, norm]
    d = d / d.norm(dim=1, keepdim=True) * scale
    d[:100] = 0.0
    d[100:200, :] = norm / math.sqrt(dim) * (1 - 1e-12)  # each coordinate shifted by just over 1: the worst case
    diff = (randomized_round(a, torch.Generator().manual_seed(7))
            - randomized_round(a + d, torch.Generator().manual_seed(7))).to(torch.float64)  # the SAME uniforms
    assert torch.all(d.norm(dim=1) <= norm)
    assert torch.all(diff.norm(dim=1) <= l2 + 1e-9) and torch.all(diff.abs().sum(dim=1) <= l1 + 1e-9)
    assert torch.all(diff[:100] == 0)
    assert bool(torch.any(diff.norm(dim=1) > norm))  # rounding does add sensitivity: the sqrt(dim) term is needed
    assert lattice_sensitivity(norm, dim) == pytest.approx((math.sqrt(dim) * norm + dim, norm + math.sqrt(dim)))


def test_randomized_round_is_exact_unbiased_and_fixes_integers():
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([0.1, 0.5, 0.9, -2.3, -0.25, 2.0**40 + 0.75, 1e-300, 3.0], dtype=torch.float64)
    draws = 200_000
    out = randomized_round(x.expand(draws, -1), g)
    assert out.dtype == torch.int64
    low = torch.floor(x).to(torch.int64)
    ups = out - low
    assert torch.all((ups == 0) | (ups == 1))  # floor or ceil, nothing else (exact even at 2**40)
    frac = (x - torch.floor(x)).numpy()
    mean = ups.to(torch.float64).mean(dim=0).numpy()
    stderr = np.sqrt(frac * (1 - frac) / draws)
    assert np.all(np.abs(mean - frac) <= 4 * stderr + 1e-12), (mean, frac)
    ints = torch.tensor([-5.0, -1.0, 0.0, 1.0, 7.0, 2.0**52 - 1, -(2.0**52 - 1)], dtype=torch.float64)
    assert torch.equal(randomized_round(ints.expand(1000, -1), g), ints.to(torch.int64).expand(1000, -1))
    for bad in (float("nan"), float("inf"), 2.0**52):  # past 2**52, floor(x) + 1 is no longer exact
        with pytest.raises(ValueError):
            randomized_round(torch.tensor([bad], dtype=torch.float64), g)


def test_noise_has_skellam_moments():
    mu, n = 1e6, 200_000
    draws = noise(n, mu, torch.Generator().manual_seed(3))
    assert draws.dtype == torch.int64 and draws.shape == (n,)
    x = draws.to(torch.float64)
    assert abs(x.mean().item()) < 5 * math.sqrt(mu / n)
    assert x.var().item() / mu == pytest.approx(1.0, abs=5 * math.sqrt(2 / n))
    big = noise((4, 1000), 1e9, torch.Generator().manual_seed(4))  # exact integers at the sizes a lattice needs
    assert big.dtype == torch.int64 and big.shape == (4, 1000)
    assert big.to(torch.float64).var().item() / 1e9 == pytest.approx(1.0, abs=0.1)


def test_noise_sum_of_shares_is_skellam_of_summed_variance():
    n, g = 200_000, torch.Generator().manual_seed(5)
    total = noise(n, 3e5, g) + noise(n, 7e5, g)
    assert total.to(torch.float64).var().item() / 1e6 == pytest.approx(1.0, abs=5 * math.sqrt(2 / n))
    small = (noise(n, 2.0, g) + noise(n, 3.0, g)).numpy()  # the whole law, not just the variance: Sk(5)
    edges = np.arange(-7, 8)
    observed = np.array([np.sum(small < -6), *[np.sum(small == k) for k in edges[1:-1]], np.sum(small > 6)])
    pmf = stats.skellam.pmf(edges[1:-1], 2.5, 2.5)
    tail = stats.skellam.cdf(-7, 2.5, 2.5)
    expected = n * np.array([tail, *pmf, tail])
    assert stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-4


def test_noise_is_reproducible_and_zero_without_variance():
    a = noise((3, 5), 123.0, torch.Generator().manual_seed(9))
    b = noise((3, 5), 123.0, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    assert torch.equal(noise((3, 5), 0.0, None), torch.zeros(3, 5, dtype=torch.int64))
    with pytest.raises(ValueError):
        noise(3, -1.0, None)


def test_orders_are_integers_above_one():
    assert all(isinstance(a, int) and a > 1 for a in skellam.ORDERS) and max(ORDERS) == 1024
    assert list(ORDERS) == sorted(set(ORDERS)) and set(range(2, 65)) <= set(ORDERS)


def test_secure_draws_have_the_same_laws_and_never_repeat():
    """secure=True: rounding uniforms from os.urandom, Poisson from a sampler keyed by it (no torch generator)."""
    mu = 1e6
    draws = skellam.noise((200_000,), mu, secure=True)
    assert draws.dtype == torch.int64
    assert abs(float(draws.double().mean())) < 4 * math.sqrt(mu / 200_000)
    assert abs(float(draws.double().var()) / mu - 1) < 0.02
    assert not torch.equal(draws, skellam.noise((200_000,), mu, secure=True))
    x = torch.full((200_000,), 3.25, dtype=torch.float64)
    rounded = skellam.randomized_round(x, secure=True)
    assert set(rounded.unique().tolist()) == {3, 4}
    assert abs(float(rounded.double().mean()) - 3.25) < 4 * math.sqrt(0.25 * 0.75 / 200_000)
    assert torch.equal(skellam.randomized_round(torch.tensor([-7.0, 12.0], dtype=torch.float64), secure=True),
                       torch.tensor([-7, 12]))


def test_the_head_engine_releases_the_per_record_clipped_sum_rounded_onto_the_lattice():
    """HeadDPSGD on the lattice, no noise: K / γ is the sum of per-record clipped gradients computed one record
    at a time with autograd (the obviously correct reference), to within the rounding (< 1 unit a coordinate)."""
    from torch import nn

    from fedslm.privacy.head_dpsgd import HeadDPSGD

    torch.manual_seed(0)
    head = nn.Linear(6, 4, bias=False)
    x, y = torch.randn(40, 6), torch.randint(0, 4, (40,))

    class Feats:
        def batch(self, idx):
            return {"hidden": x[idx], "labels": y[idx]}

    clip, gamma = 0.3, 2.0**13 / 0.3
    engine = HeadDPSGD(head, nn.Identity(), Feats(), optimizer=torch.optim.SGD(head.parameters(), lr=0.0),
                       noise_multiplier=1.0, max_grad_norm=clip, expected_batch_size=40, physical_batch_size=16,
                       lattice=(gamma, 0.0))
    reference = torch.zeros_like(head.weight, dtype=torch.float64)
    for i in range(40):
        head.zero_grad()
        nn.functional.cross_entropy(head(x[i:i + 1]), y[i:i + 1]).backward()
        g = head.weight.grad.double()
        reference += g * min(1.0, clip / (float(g.norm()) + 1e-6))
    engine.step(list(range(40)))
    (k,) = engine.lattice_sums
    assert k.dtype == torch.int64
    assert float((k.double() - gamma * reference).abs().max()) < 1.0 + 1e-6
    assert float(reference.abs().max()) * gamma > 1000  # the comparison is not vacuous
