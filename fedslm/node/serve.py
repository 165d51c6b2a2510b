"""What an institution's node does in a round, with no Flower types in sight.

Every request is untrusted input: its run config becomes this node's :class:`RoundPlan` through
the node policy (:mod:`fedslm.node.plan`), and only that plan reaches training, the ledger and the
data. In simulation the scenario stands for every node's policy; in deployment the SuperNode's
node config names the policy file, and a node without one refuses to serve. The round's records,
model and adapter are built in :mod:`fedslm.node.institution`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from flwr.supercore.differential_privacy import KEY_NORM_BIT
from peft import PeftModel

from fedslm.data import TaskData
from fedslm.errors import FedslmError
from fedslm.lora import get_adapter_state
from fedslm.node.clipping import ClippingMismatch, check_clipping, client_clip
from fedslm.node.institution import FingerprintMismatch, node_device  # noqa: F401 - re-exported
from fedslm.node.institution import build_institution, institution_task_data, with_adapter
from fedslm.node.metrics import calibrate, public_train_metrics, release_evaluation
from fedslm.node.plan import NodeContext, PolicyRefusal, RoundPlan, parse_request_config, plan_round
from fedslm.node.policy import NODE_INSTITUTION, NODE_POLICY, PolicyError, default_floor, load_policy
from fedslm.node.releases import Releases, adapter_digest
from fedslm.node.runtime import simulated
from fedslm.node.secagg import secure_payload
from fedslm.privacy import Ledger
from fedslm.train import lpft
from fedslm.train.evaluate import evaluate, evaluation_counts
from fedslm.train.local import RoundResult, train_round
from fedslm.train.node import Node
from fedslm.train.prefix import Features, split_features
from fedslm.wire.codec import WITHHELD, Request, tensor_bytes, transfer

log = logging.getLogger("fedslm.node")


class SecureAggregationRequired(FedslmError):
    pass


class RoundTimedOut(PolicyRefusal):
    """A round ran past the policy's resources.max_seconds_per_round and was ended."""


def node_context(node_config: Mapping[str, Any]) -> NodeContext:
    """This node, from its SuperNode's node config: a deployed node names its policy file; a simulated
    one carries Flower's partition-id (the scenario then stands for its policy). A partition-id
    outside a simulation is not enough: a node without a policy refuses to serve."""
    if NODE_POLICY in node_config:
        policy = load_policy(str(node_config[NODE_POLICY]))
        return NodeContext(institution=int(node_config.get(NODE_INSTITUTION, 0)), num_institutions=0, policy=policy)
    if "partition-id" in node_config and simulated():
        return NodeContext(institution=int(node_config["partition-id"]),
                           num_institutions=int(node_config.get("num-partitions", 1)), policy=None)
    raise PolicyError(f"this SuperNode's node config names no policy file; start it with --node-config "
                      f"'{NODE_POLICY}=\"/path/to/policy.yaml\"' (write one with: fedslm node init)")


def with_floor(plan: RoundPlan, n: int) -> RoundPlan:
    """A deployed node with a private size and no data.size_floor plans for
    :func:`fedslm.node.policy.default_floor` of its ``n`` training records (see there why)."""
    dp = plan.spec.dp
    if plan.evaluation is None or plan.size_is_public or dp.planned_examples is not None or not dp.enabled:
        return plan
    return replace(plan, spec=replace(plan.spec, dp=replace(dp, planned_examples=default_floor(n))))


def _features(plan: RoundPlan, inst: Node, enc, layers: Optional[int] = None) -> Optional[Features]:
    """The split's frozen prefix under lora.layers (or ``layers``: an LP-FT probe round's 0): a deployed node
    keeps the file beside its ledger (0600, as private as the records); a simulation in the user's cache
    ($FEDSLM_CACHE_DIR)."""
    folder = Path(plan.ledger).parent / "fedslm-features" if plan.evaluation is not None else None
    return split_features(inst.model, inst.base.fingerprint, enc, plan.model,
                          plan.lora.layers if layers is None else layers, folder=folder)


def _threads(plan: RoundPlan) -> None:
    if plan.threads:
        torch.set_num_threads(plan.threads)


def _train_metrics(result: RoundResult, plan: RoundPlan, state: dict[str, torch.Tensor],
                   request: Request) -> dict[str, Any]:
    return {
        "num-examples": result.num_examples,
        "unit-weight": 1,
        "institution": plan.institution,
        "train-loss": result.mean_loss,
        "epsilon": result.epsilon,
        "delta": result.delta if result.delta is not None else 0.0,
        "noise-multiplier": result.noise_multiplier if result.noise_multiplier is not None else 0.0,
        "sample-rate": result.sample_rate,
        "steps": result.steps,
        "empty-steps": result.empty_steps,
        "bytes-up": tensor_bytes(state),
        "bytes-down": request.bytes_down,
        "train-seconds": result.seconds,
        "private": result.private,
        # Every reply carries the same metric keys (Flower's FedAvg refuses a mix); 1 on a replay.
        "replayed": 0,
    }


def _check_secure(plan: RoundPlan, secure: bool) -> None:
    if secure:
        return
    if plan.require_secure_aggregation:
        raise SecureAggregationRequired(
            f"{plan.name}: this node's policy requires secure aggregation (privacy.require_secure_aggregation), and "
            "the coordinator asked for a plain update")
    if plan.secure_aggregation:
        raise SecureAggregationRequired(
            f"{plan.name}: the run config sets federation.secure_aggregation=true, but this update was asked for "
            "outside the protocol; refusing to send it unmasked")


def _released(plan: RoundPlan, request: Request, model: PeftModel) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter this node releases: clipped to the coordinator's bound under client-side clipping."""
    state = get_adapter_state(model)
    sent = {k: v.numpy() for k, v in (request.adapter or {}).items()}
    clipped, extra = client_clip(plan.client_clipping, request.clipping_norm, sent,
                                 {k: v.numpy() for k, v in state.items()})
    if extra:
        state = {k: torch.from_numpy(np.ascontiguousarray(clipped[k])) for k in state}
    return state, extra


def _published(plan: RoundPlan, metrics: dict[str, Any]) -> dict[str, Any]:
    """What of a training reply's metrics may leave: all in simulation, public facts when deployed."""
    if plan.evaluation is None:
        return metrics
    return public_train_metrics(metrics, size_is_public=plan.size_is_public)


def round_plan(request: Request, node: NodeContext) -> RoundPlan:
    return plan_round(parse_request_config(request.config_yaml), node)


def client_train(request: Request, node: NodeContext) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train one round and return the adapter to release and its metrics."""
    return _train(round_plan(request, node), request)


def _train(plan: RoundPlan, request: Request, *, secure: bool = False,
           cohort: Optional[list[int]] = None, lattice: Optional[dict[str, Any]] = None,
           data: Optional[TaskData] = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``secure``: the request came inside the secure aggregation protocol (the caller masks the
    result), among the neighbours ``cohort``. ``lattice``: filled with a distributed-noise round's
    integer sums by adapter key ("sums") and its noise share ("share"; :mod:`fedslm.privacy.distributed`)."""
    started = time.perf_counter()
    _check_secure(plan, secure)
    _threads(plan)
    data = data if data is not None else institution_task_data(plan)
    plan = with_floor(plan, len(data.train))
    request = with_adapter(plan, request, data)
    ledger = Ledger(plan.ledger)
    releases = Releases(ledger.path)
    digest = adapter_digest(request.adapter)
    entries = ledger.entries(plan.unit)
    paid = releases.find(entries, request.run_id, request.server_round, digest)
    if paid is not None:  # the coordinator lost this round after we paid for it: same request, same bytes
        state, metrics, paid_cohort = paid
        # A masked release goes out once. Masked again, even among the same neighbours (one of whom the
        # coordinator then drops before it masks), or sent in the clear, the difference of two sums
        # would isolate an update.
        if paid_cohort is not None:
            raise SecureAggregationRequired(
                f"{plan.name}: round {request.server_round} of run {request.run_id} was already released masked "
                f"among {len(paid_cohort)} neighbours; a masked release is never sent twice")
        delta = metrics.get("delta") or entries[-1]["delta"]
        metrics.update({"epsilon": ledger.spent(plan.unit, float(delta), plan.spec.dp.accountant),
                        "bytes-down": request.bytes_down, "replayed": 1, "seconds": time.perf_counter() - started})
        log.warning("%s: round %s of run %s was already paid for; sending the same update again, no new charge",
                    plan.name, request.server_round, request.run_id)
        return _on_the_wire(plan, state, _published(plan, metrics), secure)
    if any(e.get("run") == request.run_id and e.get("round") == request.server_round for e in entries):
        log.warning("%s: round %s of run %s is asked again with a different adapter; training and charging anew",
                    plan.name, request.server_round, request.run_id)
    # Whether the bound and the run agree is known before training: refuse before anything is charged.
    if request.clipping_norm is not None and not request.sends_adapter:
        raise ClippingMismatch("client-side clipping needs the global adapter in the request")
    check_clipping(plan.client_clipping, request.clipping_norm)
    probe = lpft.probe_round(plan.lora.from_round, request.server_round)
    if probe:  # LP-FT's probe rounds: the head alone, on the base encoder's sentence vectors
        if request.proximal_mu > 0:
            raise PolicyRefusal(f"{plan.name}: round {request.server_round} is an LP-FT probe round "
                                "(lora.from_round), which trains the head alone; a proximal term is refused")
        lpft.check_probe_adapter(request.adapter, request.server_round)
    inst = build_institution(plan, request, data=data)

    released: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] = []

    def keep(result: RoundResult) -> dict[str, Any]:
        released.append(_released(plan, request, inst.model))
        state, extra = released[0]
        kept = _published(plan, {**_train_metrics(result, plan, state, request), **extra})
        return releases.save(plan.unit, request.run_id, request.server_round, digest, state, kept,
                             cohort=sorted(cohort or []) if secure else None)

    features = _features(plan, inst, inst.train, lpft.round_layers(plan.lora.layers, plan.lora.from_round,
                                                                   request.server_round))
    if probe and features is None:  # no cached vectors (over $FEDSLM_CACHE_MAX_BYTES): the whole model would train
        raise PolicyRefusal(f"{plan.name}: round {request.server_round} is an LP-FT probe round, which trains the "
                            "head on cached sentence vectors, and this node has none (over $FEDSLM_CACHE_MAX_BYTES?)")
    with lpft.head_frozen(inst.model, lpft.freezes_head(plan.lora.train_head, plan.lora.from_round,
                                                        request.server_round)):
        result = train_round(
            inst.model, inst.train, plan.spec, unit=plan.unit, ledger=ledger,
            run_id=request.run_id, round_idx=request.server_round, proximal_mu=request.proximal_mu,
            release=keep if request.run_id else None, features=features, progress=_deadline(plan),
        )
    state, extra = released[0] if released else _released(plan, request, inst.model)  # clipped once, kept as sent
    if lattice is not None and result.lattice is not None:
        lattice.update(sums=result.lattice, share=result.lattice_share)
    metrics = {**_train_metrics(result, plan, state, request), **extra}
    if result.epsilon_alone is not None:
        metrics["epsilon-alone"] = result.epsilon_alone
    metrics["seconds"] = time.perf_counter() - started
    return _on_the_wire(plan, state, _published(plan, metrics), secure)


def _deadline(plan: RoundPlan) -> Optional[Callable[[int, int, float], None]]:
    """A progress callback that ends the round once its training has run past the policy's
    resources.max_seconds_per_round (checked after every step; a step is bounded by the batch caps).

    Nothing of an ended round is released, and its reservation stands: the ledger was charged for every
    planned step before the first record was touched (fedslm.train.local), so the steps taken are
    covered (ε only grows with steps: charging for more than were taken overstates the spend, never
    understates it), and since no update leaves the node there is nothing more to account for. Releasing
    the partial update instead would be as private (post-processing of charged steps), but it is not the
    round the coordinator asked for, and a node that answers slowly would answer with less training
    without saying so. The clock starts when training does (after the records and their features are
    ready), so that whether a round ends depends on the requested work, not on the record count."""
    if plan.max_seconds is None:
        return None
    limit, start = plan.max_seconds, time.monotonic()

    def check(step: int, steps: int, loss: float) -> None:  # noqa: ARG001
        if time.monotonic() - start > limit:
            raise RoundTimedOut(f"{plan.name}: the round ran past resources.max_seconds_per_round={limit:g} after "
                                f"{step} of {steps} steps; ended, nothing released (its planned steps stay charged)")

    return check


def _on_the_wire(plan: RoundPlan, state: dict[str, torch.Tensor], metrics: dict[str, Any],
                 secure: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The released adapter in federation.transfer_dtype (a cast after the noise: post-processing).
    Under secure aggregation the caller masks the float32 update instead."""
    if secure or plan.transfer_dtype == "float32":
        return state, metrics
    wire = transfer(state, plan.transfer_dtype)
    return wire, {**metrics, "bytes-up": tensor_bytes(wire)}


def client_secure_train(request: Request, node: NodeContext, cohort: Optional[list[int]] = None, *,
                        setup: Optional[tuple[float, ...]] = None,
                        noise: Optional[dict[str, Any]] = None) -> tuple[list[np.ndarray], float, dict[str, Any]]:
    """A round inside secure aggregation among the neighbours ``cohort``: the update to mask, its
    weight, and the metrics. ``setup``: the clipping range, levels, modulus and max weight Flower's mod
    will quantise with (from the protocol's setup stage); ``noise``: filled with a distributed-noise
    round's lattice digest, share, need and honest count (signed with the survivor list)."""
    if not request.sends_adapter:
        raise FedslmError("a secure aggregation round needs the global adapter in the request")
    plan = round_plan(request, node)
    lat = plan.spec.dp.lattice
    if lat is not None:
        from fedslm.wire.secagg import MODULUS

        if setup is None:
            raise PolicyRefusal("distributed noise: no protocol setup on record for this round; not training")
        expected = (float(lat.clipping_range), float(lat.levels), float(MODULUS), float(plan.secagg_max_weight))
        if tuple(setup) != expected:
            # Flower's mod would quantise with these: another range, levels or weight bound rescales or clips
            # the lattice values (a huge max weight turns the vector into a constant the sum gives away).
            raise PolicyRefusal("distributed noise: the protocol's setup (clipping range, levels, modulus, max "
                                "weight) differs from the run config this round was asked with; not training")
    out: dict[str, Any] = {}
    data = institution_task_data(plan)
    request = with_adapter(plan, request, data)  # the payloads below add the update to it
    state, metrics = _train(plan, request, secure=True, cohort=cohort, lattice=out, data=data)
    if lat is not None:
        from fedslm.node.secagg import lattice_payload

        share = out["share"]
        if noise is not None:
            layout = [(k, tuple(v.shape)) for k, v in out["sums"].items()]
            noise.update(lattice=lat.digest(plan.spec.dp.max_grad_norm, layout), share=share.mu_node,
                         need=share.mu_sum, honest=lat.honest)
        update, weight, extra = lattice_payload(request.adapter, state, out["sums"], lat,
                                                max_weight=plan.secagg_max_weight)
        return update, weight, _published(plan, {**metrics, **extra})
    bit = None
    if plan.secagg_bit:  # the clipped bit goes into the masked sum, never in plain text
        bit = int(metrics[KEY_NORM_BIT])
        metrics[KEY_NORM_BIT] = WITHHELD
    update, weight, extra = secure_payload(request.adapter, state, int(metrics["num-examples"]),
                                           clipping_range=plan.secagg_clipping_range,
                                           max_weight=plan.secagg_max_weight, bit=bit)
    return update, weight, _published(plan, {**metrics, **extra})


def client_evaluate(request: Request, node: NodeContext) -> dict[str, Any]:
    started = time.perf_counter()
    plan = round_plan(request, node)
    _threads(plan)
    inst = build_institution(plan, request, for_training=False)
    if plan.evaluation is not None:
        return {"institution": plan.institution, "unit-weight": 1, **_private_evaluation(plan, request, inst),
                "seconds": WITHHELD}
    ev = evaluate(inst.model, inst.test, plan.model.task, plan.eval_batch_size,
                  features=_features(plan, inst, inst.test))
    return {"institution": plan.institution, "unit-weight": 1, **{k.replace("_", "-"): v for k, v in ev.items()},
            "seconds": time.perf_counter() - started}


def _private_evaluation(plan: RoundPlan, request: Request, inst: Node) -> dict[str, Any]:
    """A deployed node's evaluation: reserved on the held-out unit's ledger, then scored and noised."""
    ev = plan.evaluation
    assert ev is not None and plan.spec.dp.delta is not None
    delta, m = plan.spec.dp.delta, len(inst.test)
    if not delta < 1.0 / m:
        raise PolicyError(f"{plan.name}: privacy.max_delta={delta:g} is not below 1/m = {1.0 / m:.3g} for this node's "
                          f"{m} held-out records")
    with_accuracy = plan.model.task == "classification" and "accuracy" in ev.release
    with_loss = "loss" in ev.release or plan.model.task != "classification"
    release = calibrate(ev.epsilon_per_evaluation, delta, 1 + int(with_accuracy) + int(with_loss))
    Ledger(plan.ledger).reserve(ev.unit, (release.noise_multiplier, 1.0, 1), delta=delta, max_epsilon=ev.max_epsilon,
                                num_examples=m, run=request.run_id, round=request.server_round)
    counts = evaluation_counts(inst.model, inst.test, plan.model.task, plan.eval_batch_size, ev.loss_cap,
                               features=_features(plan, inst, inst.test))
    out = release_evaluation(counts, release, loss_cap=ev.loss_cap, with_loss=with_loss, task=plan.model.task)
    if plan.model.task == "classification" and not with_accuracy:
        out["accuracy"] = WITHHELD
    return out
