"""A request is a request: the coordinator's run config ∩ the node's policy -> one round plan.

Everything a message carries is untrusted input. The node parses the request's config with no
interpolation (``${oc.env:…}`` would read the node's environment; :mod:`fedslm.node.request_config`),
validates it like any config, and then takes from it only what may vary within its policy:

=====================  ================================================================
taken from the request  rounds (for the noise plan), local steps, batch sizes, lr, optimizer,
                        weight decay, train seed, LoRA shape (the head's bias trained or
                        held at 0), model preset *if the policy allows it*, max_length,
                        pooling, head seed, head dropout, label set, clip norm, a
                        fixed σ, the target ε *up to the node's cap*, secure noise (only ever
                        switched on), transfer dtype, client-side clipping, SecAgg+ settings
                        (distributed noise and its lattice among them)
decided by the node     records and their split, the privacy unit, the ledger, the ε and δ
                        caps (δ of the guarantee is the node's), the accountant, how many
                        honest contributors it counts on under distributed noise, whether a
                        non-private round may run (refused by default), secure noise when
                        required, which base models load, the smallest held-out set, threads,
                        where it writes
refused outright        a noise seed outside simulation, ``privacy.enabled=false`` unless
                        the policy allows it, a base model the policy does not list, a
                        max_length above the policy's (physical and evaluation batches
                        above its caps are cut to them: they only chunk the work); more
                        rounds, local steps or LoRA rank than its resources allow (first
                        of all, before anything is planned or charged), a round whose
                        estimated memory passes resources.max_memory_gb (before the
                        adapter is allocated)
=====================  ================================================================

A node stays available to its operator: what a request makes it compute is bounded by its policy
(``resources``), never by the request. Rounds bound the noise plan (whose cost no longer grows with
them, fedslm.privacy.calibration), local steps and the wall-clock cap bound a round's training, the
rank and the memory estimate bound what is allocated.

The rooms below (train, lora, data, privacy) receive their pieces of the plan, never the
coordinator's whole :class:`~fedslm.config.Config`.

In simulation, the researcher is coordinator and institutions at once: the scenario stands for
every node's policy (each institution's share of the data, a ledger per institution in the run
folder, the scenario's caps, and its noise seed for reproducible research runs).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from fedslm.config import Config
from fedslm.config.schema import DataConfig, FederationConfig, LoraConfig, ModelConfig
from fedslm.errors import FedslmError
from fedslm.node.policy import NodePolicy, PolicyError, PolicyEvaluation
from fedslm.node.request_config import BadRequest, parse_request_config  # noqa: F401 - re-exported
from fedslm.train.device import simulation_device
from fedslm.train.local import DPSpec, RoundSpec, round_spec
from fedslm.wire.secagg import bit_in_sum, max_weight

log = logging.getLogger("fedslm.node")


class PolicyRefusal(FedslmError):
    """The request asks for something the node's policy does not allow."""


@dataclass(frozen=True)
class NodeContext:
    """What the node knows about itself, from its SuperNode's node config (trusted: the
    institution sets it, never the coordinator)."""

    institution: int
    num_institutions: int
    # The institution's policy; None in simulation, where the scenario stands for it.
    policy: Optional[NodePolicy]

    @property
    def simulation(self) -> bool:
        return self.policy is None

    @property
    def name(self) -> str:
        return self.policy.name if self.policy is not None else f"institution-{self.institution}"


@dataclass(frozen=True)
class RoundPlan:
    """One round as this node will run it."""

    name: str
    institution: int
    model: ModelConfig
    lora: LoraConfig
    data: DataConfig
    spec: RoundSpec
    unit: str
    ledger: Path
    threads: Optional[int]
    eval_batch_size: int
    transfer_dtype: str
    # The run config asks for secure aggregation / this node requires it.
    secure_aggregation: bool
    require_secure_aggregation: bool
    client_clipping: bool
    secagg_clipping_range: float
    secagg_max_weight: float
    # Adaptive client-side clipping under SecAgg+: the clipped bit rides in the masked sum, not in plain text.
    secagg_bit: bool
    min_test_records: int
    allowed_fingerprints: Optional[tuple[str, ...]] = None
    # Simulation only: which share of the scenario's dataset this institution holds.
    partition: Optional[FederationConfig] = None
    # Deployment: evaluation is a DP release on the held-out unit (None: exact metrics, simulation);
    # whether the training set's size may be sent.
    evaluation: Optional[PolicyEvaluation] = None
    size_is_public: bool = True
    # Where this node trains and scores (fedslm.train.device): its policy's resources.device when
    # deployed; in simulation cuda when federation.client_gpus > 0, else cpu. Never the request's.
    device: str = "cpu"
    # Deployment: the policy's resources.max_memory_gb (in bytes) and max_seconds_per_round; None in simulation.
    max_memory_bytes: Optional[float] = None
    max_seconds: Optional[float] = None


def _lattice(cfg: Config, honest: int, max_epsilon_alone: Optional[float]):
    """The lattice of a distributed-noise round (federation.secagg.distributed_noise), else None."""
    if not (cfg.federation.secagg.distributed_noise and cfg.privacy.enabled):
        return None
    from fedslm.wire.secagg import distributed_lattice

    return distributed_lattice(cfg, honest, max_epsilon_alone)


def _simulation_plan(cfg: Config, node: NodeContext) -> RoundPlan:
    i = node.institution
    if cfg.privacy.ledger:
        ledger = Path(cfg.privacy.ledger).expanduser()
        ledger = ledger.with_name(f"{ledger.stem}-institution-{i}{ledger.suffix or '.json'}")
    else:
        ledger = Path(cfg.output.dir) / "ledgers" / f"institution-{i}.json"
    spec = round_spec(cfg)
    dist = cfg.privacy.distributed
    spec = replace(spec, dp=replace(spec.dp, seed_salt=f"institution-{i}",
                                    lattice=_lattice(cfg, dist.honest, dist.max_epsilon_alone)))
    return RoundPlan(
        name=node.name, institution=i, model=cfg.model, lora=cfg.lora, data=cfg.data, spec=spec,
        unit=cfg.privacy.unit, ledger=ledger, threads=cfg.train.threads or cfg.federation.client_cpus,
        eval_batch_size=cfg.train.eval_batch_size, transfer_dtype=cfg.federation.transfer_dtype,
        secure_aggregation=cfg.federation.secure_aggregation, require_secure_aggregation=False,
        client_clipping=cfg.privacy.client_level.enabled and cfg.privacy.client_level.clipping == "client",
        secagg_clipping_range=cfg.federation.secagg.clipping_range, secagg_max_weight=max_weight(cfg),
        secagg_bit=bit_in_sum(cfg),
        min_test_records=1, partition=cfg.federation, device=simulation_device(cfg.federation.client_gpus),
    )


def plan_round(cfg: Config, node: NodeContext) -> RoundPlan:
    """This node's plan for the request ``cfg`` (already parsed by :func:`parse_request_config`).

    Raises :class:`PolicyRefusal` for what the policy forbids; logs every request value it overrides.
    """
    if node.policy is None:
        return _simulation_plan(cfg, node)
    pol, req = node.policy, cfg.privacy
    name = pol.name
    check_work(cfg, pol)

    def overridden(what: str) -> None:
        log.warning("%s: %s", name, what)

    if not req.enabled and not pol.privacy.allow_non_private:
        raise PolicyRefusal("the request asks for a non-private round (privacy.enabled=false) and this node's "
                            "policy does not allow one (privacy.allow_non_private=false)")
    if cfg.train.full_batch and not pol.data.size_is_public:
        # A full-batch step is the noised sum divided by n: the noise's size in the update reads n off it.
        raise PolicyRefusal("the request asks for train.full_batch, whose update is divided by this node's record "
                            "count (its noise level would give the count away); this node's size is not public "
                            "(data.size_is_public=false)")
    if req.noise_seed is not None:
        raise PolicyRefusal("the request fixes privacy.noise_seed: whoever knows it could subtract the noise; a "
                            "deployed node draws its noise itself and refuses seeds")
    if cfg.model.task == "classification":
        # Decided before any record is read: the answer must not depend on the records. The records
        # are then read with the policy's label set (fedslm.node.policy.PolicyData.data_config).
        if pol.data.labels is None:
            raise PolicyError(f"{name}: this node's policy has no data.labels; a classification node must fix the "
                              "label set it agreed to")
        if cfg.data.labels is not None and list(cfg.data.labels) != list(pol.data.labels):
            raise PolicyRefusal("the request's data.labels differ from the label set in this node's policy")
    if cfg.model.name not in pol.models.allowed:
        raise PolicyRefusal(f"the request's base model {cfg.model.name!r} is not in this node's models.allowed "
                            f"({', '.join(pol.models.allowed)})")
    cap = float(pol.privacy.max_epsilon)  # type: ignore[arg-type]
    delta = float(pol.privacy.max_delta)  # type: ignore[arg-type]
    target = req.target_epsilon
    if target > cap:
        overridden(f"the request's privacy.target_epsilon={target:g} is above this node's cap; planning for "
                   f"max_epsilon={cap:g}")
        target = cap
    if req.delta is not None and req.delta != delta:
        overridden(f"the request's privacy.delta={req.delta:g} is ignored; this node's guarantee is at its "
                   f"max_delta={delta:g}")
    if req.max_epsilon is not None and req.max_epsilon != cap:
        overridden(f"the request's privacy.max_epsilon={req.max_epsilon:g} is ignored; this node's cap is {cap:g}")
    if req.ledger is not None:
        overridden("the request's privacy.ledger is ignored; this node keeps its ledger where its policy says")
    if req.unit != pol.privacy.unit:
        overridden(f"the request's privacy.unit is ignored; this node charges its unit {pol.privacy.unit!r}")
    if req.accountant != pol.privacy.accountant:
        overridden(f"the request's privacy.accountant={req.accountant} is ignored; this node composes with "
                   f"{pol.privacy.accountant}")
    secure_noise = req.secure_mode or pol.privacy.require_secure_noise
    lattice = _lattice(cfg, pol.privacy.assume_honest, pol.privacy.max_epsilon_alone)
    if lattice is not None:
        if req.distributed.honest != lattice.honest or req.distributed.max_epsilon_alone is not None:
            overridden(f"the request's privacy.distributed is ignored; this node counts on "
                       f"{lattice.honest} honest contributor(s) (privacy.assume_honest in its policy)")
    if pol.privacy.require_secure_noise and not req.secure_mode:
        overridden("noise from the OS CSPRNG (this node's policy requires it)")
    if cfg.data.max_train_records is not None:
        overridden("the request's data.max_train_records is ignored; this node trains on its whole training split")
    res = pol.resources
    if cfg.model.max_length > res.max_length:
        raise PolicyRefusal(f"the request's model.max_length={cfg.model.max_length} is above this node's "
                            f"resources.max_length={res.max_length}")
    t = cfg.train
    physical, eval_batch = min(t.physical_batch_size, res.max_physical_batch_size), min(t.eval_batch_size,
                                                                                       res.max_eval_batch_size)
    feature_batch = min(t.physical_batch_size, res.max_feature_batch_size)
    # Head-only rounds chunk cached vectors (feature_batch); model passes, also those of a head-only
    # round whose features were not cached, are cut to max_physical_batch_size.
    for resource, chunk, used in (("max_physical_batch_size", physical, cfg.lora.layers != 0),
                                  ("max_feature_batch_size", feature_batch, cfg.lora.layers == 0)):
        if used and chunk < t.physical_batch_size:
            overridden(f"the request's train.physical_batch_size={t.physical_batch_size} is above this node's "
                       f"resources.{resource}; computing in chunks of {chunk}")
    if eval_batch < t.eval_batch_size:
        overridden(f"the request's train.eval_batch_size={t.eval_batch_size} is above this node's "
                   f"resources.max_eval_batch_size; evaluating in batches of {eval_batch}")
    max_test = cfg.data.max_test_records
    if max_test is not None and max_test < pol.data.min_test_records:
        overridden(f"the request's data.max_test_records={max_test} is below this node's min_test_records; "
                   f"scoring {pol.data.min_test_records}")
        max_test = pol.data.min_test_records
    spec = RoundSpec(
        task=cfg.model.task, batch_size=t.batch_size, physical_batch_size=physical,
        local_steps=t.local_steps, lr=t.lr, optimizer=t.optimizer, weight_decay=t.weight_decay, seed=t.seed,
        momentum=t.momentum, full_batch=t.full_batch, feature_batch_size=feature_batch, precision=t.precision,
        dp=DPSpec(
            enabled=req.enabled, target_epsilon=target,
            max_epsilon=cap if req.enabled else math.inf, delta=delta, max_grad_norm=req.max_grad_norm,
            accountant=pol.privacy.accountant, planned_rounds=cfg.federation.rounds,
            noise_multiplier=req.noise_multiplier, secure_mode=secure_noise, noise_seed=None,
            allow_non_private=pol.privacy.allow_non_private,
            planned_examples=None if pol.data.size_is_public else pol.data.size_floor, lattice=lattice,
            clipping_mode=cfg.privacy.clipping_mode,  # an engine choice: the same clipped sum either way
        ),
    )
    d = pol.data
    if not d.size_is_public and d.size_floor is None and req.enabled:
        log.warning("%s: data.size_floor is not set: the noise is planned for the largest power of two at or below "
                    "the record count (fedslm.node.policy.default_floor), which the update's noise level and the "
                    "refusals of batches above it give away; set data.size_floor to a public lower bound", name)
    data = d.data_config(max_test_records=max_test)
    cl = cfg.privacy.client_level
    return RoundPlan(
        name=name, institution=node.institution, model=cfg.model, lora=cfg.lora, data=data, spec=spec,
        unit=pol.privacy.unit, ledger=Path(str(pol.privacy.ledger)).expanduser(), threads=pol.threads,
        eval_batch_size=eval_batch, transfer_dtype=cfg.federation.transfer_dtype,
        secure_aggregation=cfg.federation.secure_aggregation,
        require_secure_aggregation=pol.privacy.require_secure_aggregation,
        client_clipping=cl.enabled and cl.clipping == "client",
        secagg_clipping_range=cfg.federation.secagg.clipping_range, secagg_max_weight=max_weight(cfg),
        secagg_bit=bit_in_sum(cfg),
        min_test_records=d.min_test_records,
        allowed_fingerprints=tuple(pol.models.fingerprints) if pol.models.fingerprints else None,
        evaluation=pol.evaluation, size_is_public=d.size_is_public, device=res.device,
        max_memory_bytes=res.max_memory_gb * 2**30, max_seconds=res.max_seconds_per_round,
    )


def check_work(cfg: Config, policy: NodePolicy) -> None:
    """Refuse a request for more work than the node's resources allow, before anything else is done
    with it: the noise plan's cost grows with the rounds, a round's time with its local steps, the
    adapter's memory with the LoRA rank."""
    res = policy.resources
    for key, asked, cap in (("federation.rounds", cfg.federation.rounds, res.max_rounds_per_run),
                            ("train.local_steps", cfg.train.local_steps, res.max_local_steps),
                            ("lora.r", cfg.lora.r, res.max_lora_rank)):
        if asked > cap:
            resource = {"federation.rounds": "max_rounds_per_run", "train.local_steps": "max_local_steps",
                        "lora.r": "max_lora_rank"}[key]
            raise PolicyRefusal(f"the request's {key}={asked} is above this node's resources.{resource}={cap}")


# Bytes a training step holds per token and layer, in float32 values: hidden states, attention
# projections, MLP and layer norms kept for the backward pass (about 16 hidden-sized vectors a token;
# an estimate, not a measurement), plus the attention scores (heads × length a token).
_VALUES_PER_TOKEN_LAYER = 16
# A Python list of Python ints (the Poisson batches' record indices, drawn for every step up front).
_BYTES_PER_INDEX = 36


def round_memory(plan: RoundPlan, model: Any, num_labels: Optional[int]) -> dict[str, float]:
    """An estimate, in bytes, of what one round of ``plan`` holds on the base ``model`` (already
    loaded, not yet wrapped): the base, the LoRA adapter and head with their gradients, optimiser
    state and per-record gradients (one per record of a physical batch), the activations of a
    physical batch (and causal LMs' logits), and the batches' record indices. It depends on the
    request and the public base only, never on the records (a refusal must not tell their count)."""
    lora, spec, mcfg = plan.lora, plan.spec, getattr(model, "config", None)
    hidden = int(getattr(mcfg, "hidden_size", 0) or 0)
    layers = int(getattr(mcfg, "num_hidden_layers", 0) or 0)
    heads = int(getattr(mcfg, "num_attention_heads", 0) or 0)
    vocab = int(getattr(mcfg, "vocab_size", 0) or 0)
    targets = list(lora.target_modules or [])  # the preset's defaults already filled in (check_memory)
    adapter = 0
    for name, module in model.named_modules():
        fan_in, fan_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if not isinstance(fan_in, int) or not isinstance(fan_out, int):
            continue
        if targets == ["all-linear"] or any(name == t or name.endswith("." + t) for t in targets):
            adapter += lora.r * (fan_in + fan_out)
    trained_layers = layers if lora.layers is None else max(lora.layers, 1)
    if layers and lora.layers is not None:
        adapter = adapter * trained_layers // layers
    head = hidden * (num_labels or 0) + (num_labels or 0)
    params = adapter + head
    base = sum(p.numel() * p.element_size() for p in model.parameters())
    length = plan.model.max_length
    head_only = lora.layers == 0
    chunk = (spec.feature_batch_size or spec.physical_batch_size) if head_only else spec.physical_batch_size
    if head_only:  # cached sentence vectors, no model pass and no per-record gradient tensors
        per_record, activations = 0, chunk * (hidden + 4 * (num_labels or 1)) * 4 * 4
    else:
        per_record = params * chunk * 4
        activations = chunk * length * trained_layers * (_VALUES_PER_TOKEN_LAYER * hidden + heads * length) * 4
        if plan.model.task != "classification":
            activations += chunk * length * vocab * 4 * 2  # logits and their gradient
    evaluation = plan.eval_batch_size * length * (2 * hidden + heads * length + (
        vocab if plan.model.task != "classification" else 0)) * 4
    batches = 0 if spec.full_batch else spec.local_steps * spec.batch_size * _BYTES_PER_INDEX
    return {"base": float(base), "adapter": float(params * 4 * 4), "per-record gradients": float(per_record),
            "activations": float(max(activations, evaluation)), "batch indices": float(batches)}


def check_memory(plan: RoundPlan, model: Any, num_labels: Optional[int], default_targets: tuple[str, ...]) -> None:
    """Refuse, before the adapter is allocated, a round whose estimate passes resources.max_memory_gb."""
    if plan.max_memory_bytes is None:
        return
    if plan.lora.target_modules is None:
        plan = replace(plan, lora=replace(plan.lora, target_modules=list(default_targets)))
    parts = round_memory(plan, model, num_labels)
    total = sum(parts.values())
    if total > plan.max_memory_bytes:
        largest = max(parts, key=lambda k: parts[k])
        raise PolicyRefusal(f"the requested round would hold about {total / 2**30:.3g} GiB ({largest}: "
                            f"{parts[largest] / 2**30:.3g} GiB; lora.r={plan.lora.r}, train.physical_batch_size="
                            f"{plan.spec.physical_batch_size}, train.local_steps={plan.spec.local_steps}, "
                            f"train.batch_size={plan.spec.batch_size}), above this node's resources.max_memory_gb="
                            f"{plan.max_memory_bytes / 2**30:g}")

