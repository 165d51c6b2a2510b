"""ε of a DP-SGD history with Opacus' accountants (RDP or PRV).

A history is a list of ``(noise_multiplier, sample_rate, steps)`` — Opacus'
own accountant history format — composed in full every time it is read.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Sequence

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant

Step = tuple[float, float, int]

# Opacus' orders plus larger ones: short, low-noise plans (few local steps) have their
# optimum above 63, and a missing order only loosens the bound (never wrong, just worse).
RDP_ALPHAS = [*RDPAccountant.DEFAULT_ALPHAS, 80, 96, 128, 192, 256, 384, 512, 1024]


def accountant_kwargs(accountant: str) -> dict:
    return {"alphas": RDP_ALPHAS} if accountant == "rdp" else {}


def epsilon(history: Iterable[Step], delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` after every step in ``history``; ∞ if any step had no noise."""
    merged = _merge(history)
    if not merged:
        return 0.0
    if any(sigma <= 0 for sigma, q, _ in merged if q > 0):
        return math.inf
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in merged if q > 0]
    if not acc.history:
        return 0.0
    with np.errstate(divide="ignore"), warnings.catch_warnings():  # PRV at q = 1: log(1 - q) = -inf, handled
        if accountant == "prv":
            # PRV sizes its discretisation domain from an RDP bound on Opacus' default orders; at large σ
            # that bound's optimum lies past them, which only widens the domain (the ε is PRV's own).
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(acc.get_epsilon(delta=delta, **accountant_kwargs(accountant)))


def _merge(history: Iterable[Step]) -> list[Step]:
    """Merge runs of identical (σ, q) so long ledgers compose quickly."""
    out: list[Step] = []
    for sigma, q, steps in history:
        if steps <= 0:
            continue
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((sigma, q, steps))
    return out


def epsilon_per_round(
    noise_multiplier: float, sample_rate: float, steps_per_round: int, rounds: int, delta: float,
    accountant: str = "rdp", prior: Sequence[Step] = (),
) -> list[float]:
    """ε reached after each of ``rounds`` rounds, on top of a ``prior`` history."""
    return [
        epsilon([*prior, (noise_multiplier, sample_rate, steps_per_round * r)], delta, accountant)
        for r in range(1, rounds + 1)
    ]
