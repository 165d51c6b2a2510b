"""Noise calibrated to the whole plan: rounds × local steps at sample rate q reach ε at δ."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
from opacus.accountants.utils import get_noise_multiplier

from fedslm.errors import ConfigError
from fedslm.privacy.accountant import accountant_kwargs, epsilon_per_round


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
    epsilon_per_round: tuple[float, ...]

    @property
    def total_steps(self) -> int:
        return self.local_steps * self.rounds

    @property
    def epsilon(self) -> float:
        return self.epsilon_per_round[-1]


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
        try:
            with warnings.catch_warnings(), np.errstate(divide="ignore"):  # PRV at q = 1: log(1 - q) = -inf, handled
                # Opacus' search starts at σ=20, where the optimal RDP order is off its grid; the
                # ε we report is recomputed below at the chosen σ, where it is not.
                warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
                sigma = get_noise_multiplier(
                    target_epsilon=target_epsilon, target_delta=delta, sample_rate=q, steps=steps,
                    accountant=accountant, epsilon_tolerance=min(epsilon_tolerance, target_epsilon / 100),
                    **accountant_kwargs(accountant),
                )
        except ValueError:
            raise ConfigError(
                f"privacy.target_epsilon={target_epsilon} cannot be reached with {steps} steps at sample rate "
                f"{q:.3g}: fewer rounds or local steps, or a smaller batch"
            ) from None
    else:
        sigma = float(noise_multiplier)
    per_round = epsilon_per_round(sigma, q, local_steps, rounds, delta, accountant)
    return PrivacyPlan(num_examples, batch_size, q, local_steps, rounds, float(sigma), float(delta),
                       float(target_epsilon), accountant, tuple(per_round))
