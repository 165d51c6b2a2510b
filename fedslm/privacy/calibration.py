"""Noise calibrated to the whole plan: rounds × local steps at sample rate q reach ε at δ."""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
from opacus.accountants.utils import get_noise_multiplier

from fedslm.errors import ConfigError
from fedslm.privacy.accountant import accountant_kwargs, epsilon, epsilon_per_round, prv_fallback

log = logging.getLogger("fedslm.privacy")


def default_delta(num_examples: int) -> float:
    """δ = 1/(10 n): comfortably below 1/n, the point where DP stops meaning anything."""
    return 1.0 / (10.0 * num_examples)


@dataclass(frozen=True)
class PrivacyPlan:
    num_examples: int
    batch_size: int
    sample_rate: float
    local_steps: int
    rounds: int
    noise_multiplier: float
    delta: float
    target_epsilon: float
    accountant: str

    @property
    def total_steps(self) -> int:
        return self.local_steps * self.rounds

    # Computed when asked (fedslm privacy plan shows the curve): a node serving a request needs σ and q only,
    # and must not spend a composition per planned round.
    @functools.cached_property
    def epsilon_per_round(self) -> tuple[float, ...]:
        return tuple(epsilon_per_round(self.noise_multiplier, self.sample_rate, self.local_steps, self.rounds,
                                       self.delta, self.accountant))

    @functools.cached_property
    def epsilon(self) -> float:
        return epsilon([(self.noise_multiplier, self.sample_rate, self.total_steps)], self.delta, self.accountant)


@functools.lru_cache(maxsize=256)  # a pure function of its arguments; PRV takes seconds (a simulation asks every round)
def plan(
    *,
    num_examples: int,
    batch_size: int,
    local_steps: int,
    rounds: int,
    target_epsilon: float,
    delta: Optional[float] = None,
    accountant: str = "rdp",
    noise_multiplier: Optional[float] = None,
    epsilon_tolerance: float = 0.01,
) -> PrivacyPlan:
    """σ (unless fixed) such that the planned steps never overshoot ``target_epsilon``."""
    if num_examples < 1:
        raise ConfigError(f"a privacy plan needs at least 1 training record, got {num_examples}")
    if batch_size > num_examples:
        raise ConfigError(
            f"train.batch_size ({batch_size}) exceeds the {num_examples} training records; "
            "lower train.batch_size (the sample rate is batch_size / records)"
        )
    q = batch_size / num_examples
    if delta is None:
        delta = default_delta(num_examples)
    elif delta >= 1.0 / num_examples:
        raise ConfigError(
            f"privacy.delta must be < 1/n = {1.0 / num_examples:.3g} for n={num_examples} records, got {delta}"
        )
    steps = local_steps * rounds
    if noise_multiplier is None:
        tolerance = min(epsilon_tolerance, target_epsilon / 100)
        sigma = _search(target_epsilon, delta, q, steps, "rdp", tolerance)
        if accountant == "prv" and q == 1.0:  # full batch: the exact Gaussian composition (fedslm.privacy.gaussian)
            from fedslm.privacy import gaussian

            sigma = gaussian.noise_multiplier(target_epsilon, delta, steps)
        elif accountant == "prv":
            # Each step of PRV's search composes the whole plan on its grid, which grows with √steps and as σ
            # falls; the search visits σ down to about half of RDP's (PRV is the tighter bound). Past PRV's
            # bounds, RDP's σ is kept: a looser upper bound, so more noise, never less privacy.
            reason = prv_fallback([(sigma / 2, q, steps)], delta)
            if reason is None:
                sigma = _search(target_epsilon, delta, q, steps, "prv", tolerance)
            else:
                log.info("planning σ with RDP instead of PRV: %s", reason)
    else:
        sigma = float(noise_multiplier)
    return PrivacyPlan(num_examples, batch_size, q, local_steps, rounds, float(sigma), float(delta),
                       float(target_epsilon), accountant)


def _search(target_epsilon: float, delta: float, q: float, steps: int, accountant: str, tolerance: float) -> float:
    try:
        with warnings.catch_warnings(), np.errstate(divide="ignore"):  # PRV at q = 1: log(1 - q) = -inf, handled
            # Opacus' search starts at σ=20, where the optimal RDP order is off its grid; the
            # ε we report is recomputed at the chosen σ, where it is not.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=q, steps=steps,
                accountant=accountant, epsilon_tolerance=tolerance, **accountant_kwargs(accountant),
            ))
    except ValueError:
        raise ConfigError(
            f"privacy.target_epsilon={target_epsilon} cannot be reached with {steps} steps at sample rate "
            f"{q:.3g}: fewer rounds or local steps, or a smaller batch"
        ) from None
