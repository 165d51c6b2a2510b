"""One node's local training round: plan, check the budget, train, charge, release.

The order is the privacy contract: the node's own cap is checked against the
whole ledger *before* training, and the round's steps are written to the
ledger *before* the caller can read the adapter (``RoundResult`` is only
returned after the charge is on disk).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from fedslm.config.schema import Config
from fedslm.data.tasks import Encoded, get_task
from fedslm.errors import BudgetExceededError
from fedslm.privacy import csprng
from fedslm.privacy.calibration import PrivacyPlan, plan
from fedslm.privacy.dpsgd import DPSGD, PlainSGD, check_secure_mode, make_optimizer, poisson_batches
from fedslm.privacy.ledger import Ledger
from fedslm.train.losses import PER_RECORD_LOSS

ProgressFn = Callable[[int, int, float], None]


@dataclass(frozen=True)
class RoundResult:
    num_examples: int
    steps: int
    empty_steps: int
    mean_batch_size: float
    mean_loss: float
    seconds: float
    private: bool
    # Total spend of this node on this dataset after the round (whole ledger), and its δ.
    epsilon: float
    delta: Optional[float]
    noise_multiplier: Optional[float]
    sample_rate: float
    noise_source: str


def ledger_path(cfg: Config) -> Path:
    return Path(cfg.privacy.ledger) if cfg.privacy.ledger else Path(cfg.output.dir) / "privacy_ledger.json"


def privacy_plan(cfg: Config, num_examples: int) -> PrivacyPlan:
    p = cfg.privacy
    return plan(
        num_examples=num_examples, batch_size=cfg.train.batch_size, local_steps=cfg.train.local_steps,
        rounds=cfg.federation.rounds, target_epsilon=p.target_epsilon, delta=p.delta,
        accountant=p.accountant, noise_multiplier=p.noise_multiplier,
    )


def _generator(seed: Optional[int], *salt: object) -> torch.Generator:
    """Seeded from (seed, salt) for reproducible research runs, else from the OS's CSPRNG.

    The salt is (purpose, dataset, round), not the run: a rerun with the same seed draws the same
    batches and noise. (Two runs with one seed therefore share noise; a seed is for research only,
    see privacy.noise_seed. A model's dropout still draws from torch's global generator.)"""
    if seed is None:
        return torch.Generator().manual_seed(secrets.randbits(63))
    digest = hashlib.sha256(repr((seed, *salt)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _proximal(params: list[torch.nn.Parameter], mu: float) -> Callable[[], None]:
    """FedProx: add mu * (w - w_start) to each gradient (no data involved, so no privacy cost)."""
    start = [q.detach().clone() for q in params]

    def add() -> None:
        with torch.no_grad():
            for q, q0 in zip(params, start):
                if q.grad is not None:
                    q.grad.add_(q - q0, alpha=mu)

    return add


def train_round(
    model: nn.Module,
    train: Encoded,
    cfg: Config,
    *,
    dataset_id: str,
    ledger: Ledger,
    run_id: str = "",
    round_idx: int = 1,
    progress: Optional[ProgressFn] = None,
    proximal_mu: float = 0.0,
    release: Optional[Callable[[RoundResult], dict]] = None,
) -> RoundResult:
    """Run ``train.local_steps`` steps on ``model``'s trainable tensors, DP unless disabled.

    ``proximal_mu`` > 0 adds FedProx's pull towards the weights the round started from.
    ``release``, if given, is called after training and before the charge (with ε not yet
    known: NaN); what it returns is recorded in the ledger entry (the kept update's name and hash).
    """
    p, t = cfg.privacy, cfg.train
    n = len(train)
    task = get_task(cfg.model.task)
    per_record = PER_RECORD_LOSS[cfg.model.task]

    def loss_fn(module: nn.Module, indices) -> torch.Tensor:
        return per_record(module, task.collate(train, indices))

    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = make_optimizer(params, t.optimizer, t.lr, t.weight_decay)
    extra_grad = _proximal(params, proximal_mu) if proximal_mu > 0 else None
    if p.enabled:
        pl = privacy_plan(cfg, n)
        step_record = (pl.noise_multiplier, pl.sample_rate, t.local_steps)
        max_eps = p.max_epsilon if p.max_epsilon is not None else p.target_epsilon
        ledger.check(dataset_id, step_record, delta=pl.delta, max_epsilon=max_eps, accountant=p.accountant)
        noise_source = check_secure_mode(p.secure_mode)
        engine: DPSGD | PlainSGD = DPSGD(
            model, optimizer=optimizer, noise_multiplier=pl.noise_multiplier, max_grad_norm=p.max_grad_norm,
            expected_batch_size=t.batch_size, physical_batch_size=t.physical_batch_size,
            noise_generator=_generator(p.noise_seed, "noise", dataset_id, round_idx),
            secure_mode=p.secure_mode, extra_grad=extra_grad,
        )
        q, delta, sigma = pl.sample_rate, pl.delta, pl.noise_multiplier
        sampler = _generator(p.noise_seed, "sample", dataset_id, round_idx)
    else:
        if p.max_epsilon is not None:
            raise BudgetExceededError(
                f"privacy.enabled=false would release updates with no privacy guarantee (ε=∞), past this node's "
                f"privacy.max_epsilon={p.max_epsilon:g}; refusing to train"
            )
        engine = PlainSGD(model, optimizer=optimizer, physical_batch_size=t.physical_batch_size,
                          extra_grad=extra_grad)
        q, delta, sigma, noise_source = min(1.0, t.batch_size / n), None, None, "none (privacy disabled)"
        sampler = _generator(t.seed, "sample", dataset_id, round_idx)

    if p.enabled and p.secure_mode:  # the batches' membership, too, from the OS CSPRNG
        batches = [[int(i) for i in np.flatnonzero(csprng.poisson_mask(n, q))] for _ in range(t.local_steps)]
    else:
        batches = poisson_batches(n, q, t.local_steps, sampler)
    start = time.perf_counter()
    loss_sum, seen = 0.0, 0
    try:
        for i, batch in enumerate(batches, start=1):
            loss_sum += engine.step(batch, loss_fn)
            seen += len(batch)
            if progress is not None:
                progress(i, len(batches), loss_sum / max(seen, 1))
    finally:
        engine.close()
    seconds = time.perf_counter() - start

    result = RoundResult(
        num_examples=n,
        steps=len(batches),
        empty_steps=sum(1 for b in batches if not b),
        mean_batch_size=seen / max(len(batches), 1),
        mean_loss=loss_sum / seen if seen else math.nan,
        seconds=seconds,
        private=p.enabled,
        epsilon=math.nan,
        delta=delta,
        noise_multiplier=sigma,
        sample_rate=q,
        noise_source=noise_source,
    )
    kept = release(result) if release is not None else None
    # Charge before release. A non-private round is recorded as σ=0 (ε=∞): the data was exposed.
    charged = (sigma if sigma is not None else 0.0, q, t.local_steps)
    spent = ledger.charge(
        dataset_id, charged, delta=delta if delta is not None else 1.0 / (10 * n), num_examples=n,
        run=run_id, round=round_idx, accountant=p.accountant, release=kept,
    )
    return dataclasses.replace(result, epsilon=spent)
