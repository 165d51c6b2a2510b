"""The exact ε of full-batch Gaussian rounds (fedslm.privacy.gaussian) against Opacus' PRV accountant, an
independent numerical composition of the same privacy loss distribution: PRV's figure is an upper bound
within its error (0.01), so the exact ε must lie just below it, never above."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from opacus.accountants import PRVAccountant

from fedslm.privacy import accountant, gaussian
from fedslm.privacy.calibration import plan


def _opacus_prv(history, delta):
    acc = PRVAccountant()
    acc.history = list(history)
    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return acc.get_epsilon(delta=delta)


@pytest.mark.parametrize("history,delta", [
    ([(5.8, 1.0, 100)], 2e-5), ([(2.0, 1.0, 10)], 1e-5), ([(20.0, 1.0, 100)], 1e-7), ([(0.8, 1.0, 1)], 1e-5),
    ([(5.0, 1.0, 30), (9.0, 1.0, 70)], 1e-6),  # rounds planned at two σ compose into one μ
])
def test_exact_gaussian_epsilon_lies_just_below_prvs_upper_bound(history, delta):
    exact = accountant.epsilon(history, delta, "prv")
    prv = _opacus_prv(history, delta)
    assert exact <= prv and prv - exact < 0.0125
    assert gaussian.delta(exact, gaussian.mu([(s, n) for s, _, n in history])) <= delta  # a guarantee


def test_gaussian_composition_is_one_mechanism_of_the_summed_mu():
    # 100 steps at σ = 20 are one step at σ = 2: μ = √100 / 20 = 1 / 2
    assert accountant.epsilon([(20.0, 1.0, 100)], 1e-5, "prv") == accountant.epsilon([(2.0, 1.0, 1)], 1e-5, "prv")
    assert accountant.epsilon([(1.0, 1.0, 0)], 1e-5, "prv") == 0.0
    assert accountant.epsilon([(0.0, 1.0, 3)], 1e-5, "prv") == math.inf
    assert accountant.epsilon([(math.nan, 1.0, 3)], 1e-5, "prv") == math.inf  # never ε = 0 from a NaN
    assert gaussian.epsilon(math.nan, 1e-5) == math.inf and gaussian.epsilon(math.inf, 1e-5) == math.inf
    assert gaussian.epsilon(1e6, 1e-5) == math.inf  # σ ~ 0: no meaningful guarantee
    assert gaussian.delta(0.0, 1e-9) < 1e-9 and gaussian.epsilon(1e-9, 1e-5) == 0.0  # almost no signal: ε = 0


def test_sampled_steps_still_go_to_prv():
    history = [(1.1, 0.5, 10)]
    assert accountant.epsilon(history, 1e-5, "prv") == pytest.approx(_opacus_prv(history, 1e-5), rel=1e-9)
    mixed = [(5.8, 1.0, 10), (1.1, 0.5, 10)]  # one sampled step: the whole history goes to PRV
    assert accountant.epsilon(mixed, 1e-5, "prv") == pytest.approx(_opacus_prv(mixed, 1e-5), rel=1e-9)


@pytest.mark.parametrize("target,rounds", [(8.0, 100), (3.0, 100), (1.0, 20), (0.5, 1)])
def test_a_full_batch_plan_reaches_its_target_exactly_and_never_above(target, rounds):
    p = plan(num_examples=5000, batch_size=5000, local_steps=1, rounds=rounds, target_epsilon=target,
             accountant="prv")
    reached = accountant.epsilon([(p.noise_multiplier, 1.0, rounds)], p.delta, "prv")
    assert target - 1e-6 < reached <= target
    # PRV (Opacus) at the same σ: the exact ε plus at most its error bound
    assert _opacus_prv([(p.noise_multiplier, 1.0, rounds)], p.delta) <= target + 0.0125
