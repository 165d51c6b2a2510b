"""One node's local training round: plan, reserve the budget, train, release.

The order is the privacy contract: the round's cost is checked against the node's own cap over the
whole ledger *and written* to it, under one lock, before training starts (a crash afterwards loses
budget, never gains it); the caller reads the adapter only after that (``release`` is called with
the trained model, and the ledger entry then names the update it paid for).

This module takes a :class:`RoundSpec`, never the coordinator's whole config: on a node the spec
is what the node's policy allowed of a request (:mod:`fedslm.node.plan`); for one institution
alone (``fedslm train``) it comes from that institution's own config (:func:`round_spec`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch
from torch import nn

from fedslm.config.schema import Config
from fedslm.data.tasks import Encoded, get_task
from fedslm.errors import BudgetExceededError, DataError
from fedslm.privacy import csprng
from fedslm.privacy.calibration import PrivacyPlan, plan
from fedslm.privacy.dpsgd import DPSGD, PlainSGD, check_secure_mode, make_optimizer, poisson_batches
from fedslm.privacy.ledger import Ledger
from fedslm.train.device import model_device, resolve_precision, to_device
from fedslm.train.losses import PER_RECORD_LOSS

if TYPE_CHECKING:
    from fedslm.privacy.distributed import Lattice, Share
    from fedslm.privacy.head_dpsgd import HeadDPSGD
    from fedslm.train.prefix import Features

ProgressFn = Callable[[int, int, float], None]


@dataclass(frozen=True)
class DPSpec:
    """The differential privacy of one round, as the node decided it."""

    enabled: bool
    target_epsilon: float
    # The node's cap on its total spend for the privacy unit (the ledger refuses past it).
    max_epsilon: float
    # δ of the node's guarantee; None: 1/(10 n).
    delta: Optional[float]
    max_grad_norm: float
    accountant: str
    # Rounds the noise is calibrated for (the plan: rounds × local steps reach target_epsilon).
    planned_rounds: int
    noise_multiplier: Optional[float] = None
    secure_mode: bool = False
    noise_seed: Optional[int] = None
    # A non-private round (ε = ∞) is refused unless this is set.
    allow_non_private: bool = False
    # With noise_seed: what tells apart the streams of institutions that share a seed and a unit name
    # (simulation: the institution).
    seed_salt: str = ""
    # The record count the noise is planned and charged for: a public lower bound on n when the node's
    # size is private (its policy's data.size_floor), so that σ, and with it the noise level anyone can
    # measure in the update, is no function of n. Batches are still drawn at rate b/n (expected size b,
    # the update's divisor), and ε is charged at the larger rate b/floor: an upper bound, since the
    # subsampled Gaussian's ε grows with the sampling rate. None: n itself.
    planned_examples: Optional[int] = None
    # Distributed noise under SecAgg+ (fedslm.privacy.distributed): this node's share of Skellam noise on
    # the protocol's lattice, for the ε of the sum under its assumption of honest contributors. None: local DP.
    lattice: Optional["Lattice"] = None
    # How per-record gradients are clipped: "hooks" (dpsgd.DPSGD) or "ghost" (ghost.GhostDPSGD); the same update.
    clipping_mode: str = "hooks"


@dataclass(frozen=True)
class RoundSpec:
    task: str
    batch_size: int
    physical_batch_size: int
    local_steps: int
    lr: float
    optimizer: str
    weight_decay: float
    seed: int
    dp: DPSpec
    momentum: float = 0.0
    # Every step on every record (sample rate 1): the logical batch is the node's whole training set.
    full_batch: bool = False
    # Records per chunk when only the head trains on cached sentence vectors (one vector a record, no
    # model pass); None: physical_batch_size. A deployed node caps the two separately.
    feature_batch_size: Optional[int] = None
    # Forward/backward arithmetic (fedslm.train.device.resolve_precision): auto, fp32, bf16 or fp16.
    # Norms, clipping, noise and the released update are fp32 whatever it is.
    precision: str = "auto"

    def logical_batch(self, num_examples: int) -> int:
        return num_examples if self.full_batch else self.batch_size


def round_spec(cfg: Config) -> RoundSpec:
    """The spec of one institution training on its own (``fedslm train``, audits, local baselines),
    where the config is the institution's own: its privacy.max_epsilon (else target_epsilon) caps it,
    and privacy.enabled=false is allowed only without a cap."""
    p, t = cfg.privacy, cfg.train
    return RoundSpec(
        task=cfg.model.task, batch_size=t.batch_size, physical_batch_size=t.physical_batch_size,
        local_steps=t.local_steps, lr=t.lr, optimizer=t.optimizer, weight_decay=t.weight_decay, seed=t.seed,
        momentum=t.momentum, full_batch=t.full_batch, precision=t.precision,
        dp=DPSpec(
            enabled=p.enabled, target_epsilon=p.target_epsilon,
            max_epsilon=p.max_epsilon if p.max_epsilon is not None else (p.target_epsilon if p.enabled else math.inf),
            delta=p.delta, max_grad_norm=p.max_grad_norm, accountant=p.accountant,
            planned_rounds=cfg.federation.rounds, noise_multiplier=p.noise_multiplier, secure_mode=p.secure_mode,
            noise_seed=p.noise_seed, allow_non_private=p.max_epsilon is None, clipping_mode=p.clipping_mode,
        ),
    )


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
    # Distributed noise: the integer sums released on the lattice, by adapter key; and ε of this
    # node's own noise alone (the ledger's whole history). None under local DP.
    lattice: Optional[dict[str, torch.Tensor]] = None
    lattice_share: Optional["Share"] = None
    epsilon_alone: Optional[float] = None


def ledger_path(cfg: Config) -> Path:
    return Path(cfg.privacy.ledger) if cfg.privacy.ledger else Path(cfg.output.dir) / "privacy_ledger.json"


def privacy_plan(spec: RoundSpec, num_examples: int) -> PrivacyPlan:
    dp = spec.dp
    if dp.planned_examples is not None:
        if dp.planned_examples > num_examples:
            raise DataError(f"data.size_floor={dp.planned_examples} is above the {num_examples} training records this "
                            "node holds; a floor must be a lower bound on the count")
        num_examples = dp.planned_examples
    return plan(
        num_examples=num_examples, batch_size=spec.logical_batch(num_examples), local_steps=spec.local_steps,
        rounds=dp.planned_rounds, target_epsilon=dp.target_epsilon, delta=dp.delta,
        accountant=dp.accountant, noise_multiplier=dp.noise_multiplier,
    )


def _generator(seed: Optional[int], *salt: object) -> torch.Generator:
    """Seeded from (seed, salt) for reproducible research runs, else from the OS's CSPRNG.

    The salt is (purpose, dataset, round), not the run: a rerun with the same seed draws the same
    batches and noise. (Two runs with one seed therefore share noise; a seed is for research only,
    see privacy.noise_seed.)"""
    if seed is None:
        return torch.Generator().manual_seed(secrets.randbits(63))
    digest = hashlib.sha256(repr((seed, *salt)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _engine(clipping_mode: str) -> type:
    if clipping_mode == "ghost":
        from fedslm.privacy.ghost import GhostDPSGD

        return GhostDPSGD
    return DPSGD


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
    spec: RoundSpec,
    *,
    unit: str,
    ledger: Ledger,
    run_id: str = "",
    round_idx: int = 1,
    progress: Optional[ProgressFn] = None,
    proximal_mu: float = 0.0,
    release: Optional[Callable[[RoundResult], dict]] = None,
    features: Optional["Features"] = None,
) -> RoundResult:
    """Run ``spec.local_steps`` steps on ``model``'s trainable tensors, DP unless disabled, charged
    to privacy unit ``unit`` of ``ledger``.

    ``proximal_mu`` > 0 adds FedProx's pull towards the weights the round started from.
    ``release``, if given, is called after training (with ε not yet known: NaN); what it returns
    (the kept update's name and hash) is recorded in the round's ledger entry.
    ``features``: the frozen prefix of ``train``'s records (fedslm.train.prefix, ``lora.layers``);
    training then runs the model from there, on the same parameters.
    """
    p, t = spec.dp, spec
    n = len(train) if features is None else len(features)
    # The model is already where it trains (placed before PEFT and Opacus); batches follow it there.
    device = model_device(model)
    precision = resolve_precision(t.precision, device)  # refused here, before anything is charged
    if getattr(features, "causal", False):  # a causal LM's cached decoder prefix (fedslm.train.causal_prefix)
        from fedslm.train.causal_prefix import CausalSuffix

        trained: nn.Module = CausalSuffix(model, features.layers)

        def loss_fn(module: nn.Module, indices) -> torch.Tensor:
            return module(**to_device(features.batch(indices), device))
    elif features is not None:
        from fedslm.train.prefix import Suffix

        trained = Suffix(model, features.layers)

        def loss_fn(module: nn.Module, indices) -> torch.Tensor:
            b = to_device(features.batch(indices), device)
            logits = module(b["hidden"], b.get("attention_mask"))
            return torch.nn.functional.cross_entropy(logits.float(), b["labels"], reduction="none")
    else:
        trained = model
        task = get_task(spec.task)
        per_record = PER_RECORD_LOSS[spec.task]

        def loss_fn(module: nn.Module, indices) -> torch.Tensor:
            return per_record(module, to_device(task.collate(train, indices), device))

    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = make_optimizer(params, t.optimizer, t.lr, t.weight_decay, t.momentum)
    extra_grad = _proximal(params, proximal_mu) if proximal_mu > 0 else None
    keys: list[str] = []
    share = None  # distributed noise: this round's share of the sum's noise (fedslm.privacy.distributed)
    if p.enabled:
        pl = privacy_plan(spec, n)
        q, delta, sigma = pl.sample_rate, pl.delta, pl.noise_multiplier  # q: the rate accounted (b / floor)
        skellam = None
        if p.lattice is not None:
            keys, share = _distributed(model, features, spec, n, delta, proximal=extra_grad is not None)
            sigma, q = share.noise_multiplier, 1.0
            skellam = {"mu": share.mu_node, "honest": p.lattice.honest, "l1": share.l1, "l2": share.l2}
        # Reserved (checked and written under the ledger's lock) before a single record is touched.
        entry = ledger.reserve(unit, (sigma, q, t.local_steps), delta=delta, max_epsilon=p.max_epsilon,
                               num_examples=n, run=run_id, round=round_idx, accountant=p.accountant,
                               skellam=skellam, max_epsilon_alone=p.lattice.max_epsilon_alone if p.lattice else math.inf)
        noise_source = check_secure_mode(p.secure_mode)
        noise_gen = _generator(p.noise_seed, "noise", unit, p.seed_salt, round_idx)
        engine: DPSGD | PlainSGD | HeadDPSGD
        if features is not None and features.layers == 0 and extra_grad is None:
            # The head alone: the same DP-SGD step without per-record gradient tensors (on the lattice
            # under distributed noise).
            from fedslm.lora.prior import trainable_head
            from fedslm.privacy.head_dpsgd import HeadDPSGD

            engine = HeadDPSGD(trainable_head(model), trained.dropout, features, optimizer=optimizer,
                               noise_multiplier=sigma, max_grad_norm=p.max_grad_norm,
                               expected_batch_size=t.logical_batch(n),
                               physical_batch_size=t.feature_batch_size or t.physical_batch_size,
                               noise_generator=noise_gen, secure_mode=p.secure_mode,
                               lattice=None if share is None else (p.lattice.scale(p.max_grad_norm), share.mu_node))
        else:
            engine = _engine(p.clipping_mode)(
                trained, optimizer=optimizer, noise_multiplier=sigma, max_grad_norm=p.max_grad_norm,
                expected_batch_size=t.logical_batch(n), physical_batch_size=t.physical_batch_size,
                noise_generator=noise_gen, secure_mode=p.secure_mode, extra_grad=extra_grad, precision=precision,
            )
        sampler = _generator(p.noise_seed, "sample", unit, p.seed_salt, round_idx)
    else:
        if not p.allow_non_private:
            raise BudgetExceededError(
                f"privacy.enabled=false would release updates with no privacy guarantee (ε=∞), past this node's "
                f"cap max_epsilon={p.max_epsilon:g}; refusing to train"
            )
        q, delta, sigma, noise_source = min(1.0, t.logical_batch(n) / n), None, None, "none (privacy disabled)"
        # Recorded as σ=0 (ε=∞): the data was exposed, and no later DP round can claim a finite ε.
        entry = ledger.reserve(unit, (0.0, q, t.local_steps), delta=p.delta or 1.0 / (10 * n),
                               max_epsilon=math.inf, num_examples=n, run=run_id, round=round_idx,
                               accountant=p.accountant)
        engine = PlainSGD(trained, optimizer=optimizer, physical_batch_size=t.physical_batch_size,
                          extra_grad=extra_grad, precision=precision)
        sampler = _generator(t.seed, "sample", unit, p.seed_salt, round_idx)

    # The rate batches are drawn at: b / n, also when the noise was planned for a size floor.
    rate = min(1.0, t.logical_batch(n) / n) if p.enabled and p.planned_examples is not None else q
    if p.enabled and p.secure_mode:  # the batches' membership, too, from the OS CSPRNG
        batches = [[int(i) for i in np.flatnonzero(csprng.poisson_mask(n, rate))] for _ in range(t.local_steps)]
    else:
        batches = poisson_batches(n, rate, t.local_steps, sampler)
    start = time.perf_counter()
    loss_sum, seen = 0.0, 0
    # The model's own dropout draws from torch's global generator: seeded here like the batches and
    # the noise (from the noise seed, else the OS), inside fork_rng so nothing outside changes.
    dropout_seed = _generator(p.noise_seed if p.enabled else t.seed, "dropout", unit, p.seed_salt, round_idx).initial_seed()
    try:
        # On CUDA the dropout masks come from the GPU's generator; torch.manual_seed seeds every GPU's,
        # so all are forked.
        gpus = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
        with torch.random.fork_rng(devices=gpus):
            torch.manual_seed(dropout_seed)
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
    if share is not None:
        from fedslm.privacy.distributed import check_in_range

        sums = engine.lattice_sums  # type: ignore[union-attr]
        check_in_range(p.lattice, sums)  # type: ignore[arg-type]
        result = dataclasses.replace(result, lattice=dict(zip(keys, sums)), lattice_share=share)
    if release is not None:
        ledger.settle(unit, entry, release(result))
    at = delta if delta is not None else p.delta or 1.0 / (10 * n)
    spent = ledger.spent(unit, at, p.accountant)
    alone = ledger.spent(unit, at, p.accountant, alone=True) if share is not None else None
    return dataclasses.replace(result, epsilon=spent, epsilon_alone=alone)


def _distributed(model: nn.Module, features: Optional["Features"], spec: RoundSpec, n: int, delta: float, *,
                 proximal: bool) -> tuple[list[str], "Share"]:
    """The adapter keys of the head's trained tensors and the noise share of a distributed-noise round;
    refused (before anything is charged) outside the head-only full-batch recipe, with a FedProx term
    (the head engine has none, and the release is the noised sum itself), or when the lattice could
    overflow SecAgg+'s range."""
    from fedslm.lora.prior import trainable_head
    from fedslm.privacy.distributed import check_range, plan_share

    p, lat = spec.dp, spec.dp.lattice
    assert lat is not None
    if features is None or features.layers != 0 or not spec.full_batch or spec.local_steps != 1:
        raise DataError("distributed noise releases one noised full-batch sum of the head's gradients a round: it "
                        "needs lora.layers=0, train.full_batch=true and train.local_steps=1")
    if proximal:
        raise DataError("distributed noise releases the noised gradient sum itself: a FedProx term (the request's "
                        "proximal-mu) has no place in it; use another strategy")
    head = trainable_head(model)
    params = [q for q in (head.weight, head.bias) if q is not None and q.requires_grad]
    if p.noise_multiplier is not None:
        raise DataError("privacy.noise_multiplier fixes a Gaussian σ; distributed noise is calibrated on the lattice")
    share = plan_share(bits=lat.bits, honest=lat.honest, dim=sum(q.numel() for q in params),
                       target_epsilon=p.target_epsilon, delta=delta, rounds=p.planned_rounds)
    check_range(lat, n, share.mu_node)
    from peft import get_peft_model_state_dict

    by_storage = {v.data_ptr(): k for k, v in get_peft_model_state_dict(model).items()}
    keys = [by_storage.get(q.data_ptr()) for q in params]
    if None in keys:
        raise DataError("distributed noise: the head's trained tensors are not in the adapter")
    return keys, share  # type: ignore[return-value]
