"""Gaussian noise and Poisson sampling from the operating system's CSPRNG, for current torch.

Opacus' ``secure_mode`` needs torchcsprng, which no longer builds against current torch. This
module gives the same guarantees from ``os.urandom`` (the kernel's CSPRNG):

* uniforms: 53 random bits per draw, ``(k + 1) / 2**53`` in (0, 1], float64;
* normals: Box–Muller on two such uniforms, in float64;
* floating-point attacks (Mironov 2012; Holohan & Braghin 2021, arXiv:2107.10138): as Opacus'
  secure mode does, each noise value is the sum of 2n = 4 independent normals divided by 2
  (same variance), which makes recovering the unrounded sample infeasible (~2^159 work).

The cost is reading 8 bytes per uniform from the OS: for a LoRA adapter (10^5–10^6 values) a few
milliseconds per step.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

SOURCE = "OS CSPRNG (os.urandom), Box-Muller in float64, 4-sample smoothing (cryptographically secure)"
_TWO53 = float(2**53)


def uniform(n: int) -> np.ndarray:
    """``n`` independent uniforms in (0, 1] from the OS CSPRNG (53-bit resolution)."""
    bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return (bits.astype(np.float64) + 1.0) / _TWO53


def bits53(n: int) -> np.ndarray:
    """``n`` independent uniform integers in [0, 2**53) from the OS CSPRNG (int64)."""
    return (np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)).astype(np.int64)


def keyed_generator() -> np.random.Generator:
    """numpy's Philox-4x64-10 keyed with 128 bits from the OS CSPRNG, for samplers numpy has and this module
    does not (Poisson). Philox is a counter-based generator built like a block cipher (Salmon et al.
    2011): with a fresh 128-bit key per draw there is no seed to search, though it is not a proven CSPRNG."""
    return np.random.Generator(np.random.Philox(key=int.from_bytes(os.urandom(16), "little")))


def standard_normal(n: int) -> np.ndarray:
    """``n`` independent N(0, 1) draws (Box–Muller on CSPRNG uniforms)."""
    half = (n + 1) // 2
    u1, u2 = uniform(half), uniform(half)
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * math.pi * u2
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]


def gaussian_like(reference: torch.Tensor, std: float) -> torch.Tensor:
    """N(0, std²) noise shaped like ``reference``: the sum of 4 normals / 2, per value."""
    n = reference.numel()
    if std == 0 or n == 0:
        return torch.zeros_like(reference)
    draws = standard_normal(4 * n).reshape(4, n).sum(axis=0) / 2.0
    return torch.from_numpy(draws * std).to(dtype=reference.dtype, device=reference.device).view_as(reference)


def poisson_mask(n: int, rate: float) -> np.ndarray:
    """Which of ``n`` records join a Poisson batch with probability ``rate`` each."""
    return uniform(n) <= rate
