"""What an institution's node does in a round, with no Flower types in sight.

The run config comes from the coordinator; the node's own settings (its data,
its ledger, its ε cap) come from the node config and always win. In
simulation, an institution is a partition of one dataset, and its ledger lives
in the run folder; in deployment, the node config points at local files.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from peft import PeftModel

from fedslm.config import Config, load_config
from fedslm.data import TaskData, load_task_data
from fedslm.data.partition import institution_data
from fedslm.data.tasks import get_task
from fedslm.errors import ConfigError, FedslmError
from fedslm.federation.codec import Request, tensor_bytes, transfer
from fedslm.federation.secagg import secure_payload
from fedslm.lora import get_adapter_state, set_adapter_state, wrap
from fedslm.lora.adapter import frozen_digest
from fedslm.models import BaseModel, load_base
from fedslm.privacy import Ledger
from fedslm.privacy.client_level import ClippingMismatch, client_clip
from fedslm.privacy.releases import Releases, adapter_digest
from fedslm.train.evaluate import evaluate
from fedslm.train.local import RoundResult, train_round
from fedslm.train.node import Node

log = logging.getLogger("fedslm.node")

# Node config keys an institution sets on its SuperNode (--node-config).
NODE_DATA = "data-source"
NODE_LEDGER = "ledger"
NODE_MAX_EPSILON = "max-epsilon"
NODE_NAME = "name"
# A small integer naming the institution in the coordinator's metrics (simulation: the partition id).
NODE_INSTITUTION = "institution"
# "true": refuse to send an update unless the coordinator runs secure aggregation.
NODE_REQUIRE_SECAGG = "require-secure-aggregation"


class FingerprintMismatch(FedslmError):
    pass


class SecureAggregationRequired(FedslmError):
    pass


def _flag(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class NodeSettings:
    institution: int
    num_institutions: int
    data_source: Optional[str]
    ledger: Optional[str]
    max_epsilon: Optional[float]
    name: str
    require_secure_aggregation: bool = False


def node_settings(node_config: Mapping[str, Any]) -> NodeSettings:
    institution = int(node_config.get(NODE_INSTITUTION, node_config.get("partition-id", 0)))
    max_eps = node_config.get(NODE_MAX_EPSILON)
    return NodeSettings(
        institution=institution,
        num_institutions=int(node_config.get("num-partitions", 1)),
        data_source=str(node_config[NODE_DATA]) if NODE_DATA in node_config else None,
        ledger=str(node_config[NODE_LEDGER]) if NODE_LEDGER in node_config else None,
        max_epsilon=float(max_eps) if max_eps is not None else None,
        name=str(node_config.get(NODE_NAME, f"institution-{institution}")),
        require_secure_aggregation=_flag(node_config.get(NODE_REQUIRE_SECAGG, False)),
    )


def node_config(request: Request, node: NodeSettings) -> Config:
    """The coordinator's run config with this node's own settings on top."""
    if not request.config_yaml:
        raise ConfigError("the request carries no fedslm config (run-config 'fedslm-config' missing)")
    overrides = []
    if node.data_source:
        overrides.append(f"data.source={node.data_source}")
    cfg = load_config(texts=[request.config_yaml], overrides=overrides)
    if node.ledger:
        cfg.privacy.ledger = node.ledger
    elif cfg.privacy.ledger is None:
        cfg.privacy.ledger = str(Path(cfg.output.dir) / "ledgers" / f"{node.name}.json")
    if node.max_epsilon is not None:
        if not node.max_epsilon > 0:
            raise ConfigError(f"node config {NODE_MAX_EPSILON} must be > 0, got {node.max_epsilon}")
        cfg.privacy.max_epsilon = node.max_epsilon  # the node's cap wins over the coordinator's
    return cfg


def institution_task_data(cfg: Config, node: NodeSettings) -> TaskData:
    fed = cfg.federation
    if node.data_source:  # deployment: the node's own file, split into its train and held-out sets
        return load_task_data(cfg.data, cfg.model.task)
    group = fed.partition_column if fed.partitioner == "column" else None
    data = load_task_data(cfg.data, cfg.model.task, group_column=group)
    return institution_data(data, fed, node.institution, cfg.data.test_fraction, cfg.data.split_seed,
                            cfg.data.max_test_records)


# The last base + LoRA model this process built. A simulation's Ray actors serve many rounds and
# institutions in one process; loading the base again each time is most of a round's cost for a
# small model. Reuse is exact: the base is frozen (and fingerprinted), and every trainable tensor
# is overwritten from the request's adapter (set_adapter_state is strict about keys and shapes).
_LOADED: dict[str, tuple[BaseModel, PeftModel]] = {}


def _base_and_model(cfg: Config, num_labels: Optional[int]) -> tuple[BaseModel, PeftModel]:
    key = json.dumps([asdict(cfg.model), asdict(cfg.lora), cfg.train.seed, num_labels], sort_keys=True)
    if key not in _LOADED:
        _LOADED.clear()
        base = load_base(cfg.model, num_labels)
        _LOADED[key] = (base, wrap(base.model, cfg.lora, cfg.model.task, base.target_modules, seed=cfg.train.seed))
    return _LOADED[key]


def build_institution(cfg: Config, node: NodeSettings, request: Request, *, for_training: bool = True,
                      data: Optional[TaskData] = None) -> Node:
    data = data if data is not None else institution_task_data(cfg, node)
    num_labels = len(data.labels) if data.labels is not None else None
    if request.adapter is not None:
        base, model = _base_and_model(cfg, num_labels)
    else:
        base = load_base(cfg.model, num_labels)
        model = wrap(base.model, cfg.lora, cfg.model.task, base.target_modules, seed=cfg.train.seed)
    if request.base_fingerprint and request.base_fingerprint != base.fingerprint:
        raise FingerprintMismatch(
            f"{node.name}: base model fingerprint {base.fingerprint[:12]} differs from the coordinator's "
            f"{request.base_fingerprint[:12]} (different model.name, label set, model.init_seed or model.pooling)"
        )
    if request.frozen_digest != frozen_digest(model):
        raise FingerprintMismatch(
            f"{node.name}: the frozen LoRA A (lora.ffa) differs from the coordinator's "
            f"({frozen_digest(model)[:12] or 'none'} vs {request.frozen_digest[:12] or 'none'}): different "
            "lora settings, train.seed or library versions")
    task = get_task(cfg.model.task)
    if request.adapter is not None:
        set_adapter_state(model, request.adapter)
        for p in model.parameters():  # nothing of an earlier round may leak into this one
            p.grad = None
    # Evaluation needs only the held-out records; tokenizing the training split would be wasted time.
    train = task.encode(data.train if for_training else [], base.tokenizer, cfg.model.max_length)
    return Node(cfg, data, base, model, train, task.encode(data.test, base.tokenizer, cfg.model.max_length))


def _threads(cfg: Config) -> None:
    torch.set_num_threads(cfg.train.threads or cfg.federation.client_cpus)


def _train_metrics(result: RoundResult, node: NodeSettings, state: dict[str, torch.Tensor],
                   request: Request) -> dict[str, Any]:
    return {
        "num-examples": result.num_examples,
        "unit-weight": 1,
        "institution": node.institution,
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


def _check_secure(cfg: Config, node: NodeSettings, secure: bool) -> None:
    if secure:
        return
    if node.require_secure_aggregation:
        raise SecureAggregationRequired(
            f"{node.name}: this node's config requires secure aggregation ({NODE_REQUIRE_SECAGG}=true), and the "
            "coordinator asked for a plain update; run with federation.secure_aggregation=true")
    if cfg.federation.secure_aggregation:
        raise SecureAggregationRequired(
            f"{node.name}: the run config sets federation.secure_aggregation=true, but this update was asked for "
            "outside the protocol; refusing to send it unmasked")


def _released(cfg: Config, request: Request, model: PeftModel) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter this node releases: clipped to the coordinator's bound under client-side clipping."""
    state = get_adapter_state(model)
    sent = {k: v.numpy() for k, v in (request.adapter or {}).items()}
    if request.clipping_norm is not None and request.adapter is None:
        raise ClippingMismatch("client-side clipping needs the global adapter in the request")
    clipped, extra = client_clip(cfg, request.clipping_norm, sent, {k: v.numpy() for k, v in state.items()})
    if extra:
        state = {k: torch.from_numpy(np.ascontiguousarray(clipped[k])) for k in state}
    return state, extra


def client_train(request: Request, node: NodeSettings, *,
                 secure: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train one round and return the adapter to release and its metrics.

    ``secure``: the request came inside the secure aggregation protocol (the caller masks the result).
    """
    started = time.perf_counter()
    cfg = node_config(request, node)
    _check_secure(cfg, node, secure)
    _threads(cfg)
    data = institution_task_data(cfg, node)
    ledger = Ledger(cfg.privacy.ledger)
    releases = Releases(ledger.path)
    digest = adapter_digest(request.adapter)
    entries = ledger.entries(data.dataset_id)
    paid = releases.find(entries, request.run_id, request.server_round, digest)
    if paid is not None:  # the coordinator lost this round after we paid for it: same request, same bytes
        state, metrics = paid
        delta = metrics.get("delta") or entries[-1]["delta"]
        metrics.update({"epsilon": ledger.spent(data.dataset_id, float(delta), cfg.privacy.accountant),
                        "bytes-down": request.bytes_down, "replayed": 1,
                        "seconds": time.perf_counter() - started})
        log.warning("%s: round %s of run %s was already paid for; sending the same update again, no new charge",
                    node.name, request.server_round, request.run_id)
        return _on_the_wire(cfg, state, metrics, secure)
    if any(e.get("run") == request.run_id and e.get("round") == request.server_round for e in entries):
        log.warning("%s: round %s of run %s is asked again with a different adapter; training and charging anew",
                    node.name, request.server_round, request.run_id)
    inst = build_institution(cfg, node, request, data=data)

    released: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] = []

    def keep(result: RoundResult) -> dict[str, Any]:
        released.append(_released(cfg, request, inst.model))
        state, extra = released[0]
        return releases.save(data.dataset_id, request.run_id, request.server_round, digest, state,
                             {**_train_metrics(result, node, state, request), **extra})

    result = train_round(
        inst.model, inst.train, cfg, dataset_id=data.dataset_id, ledger=ledger,
        run_id=request.run_id, round_idx=request.server_round, proximal_mu=request.proximal_mu,
        release=keep if request.run_id else None,
    )
    state, extra = released[0] if released else _released(cfg, request, inst.model)  # clipped once, kept as sent
    metrics = {**_train_metrics(result, node, state, request), **extra}
    metrics["seconds"] = time.perf_counter() - started
    return _on_the_wire(cfg, state, metrics, secure)


def _on_the_wire(cfg: Config, state: dict[str, torch.Tensor], metrics: dict[str, Any],
                 secure: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The released adapter in federation.transfer_dtype (a cast after the noise: post-processing).
    Under secure aggregation the caller masks the float32 update instead."""
    if secure or cfg.federation.transfer_dtype == "float32":
        return state, metrics
    wire = transfer(state, cfg.federation.transfer_dtype)
    return wire, {**metrics, "bytes-up": tensor_bytes(wire)}


def client_secure_train(request: Request, node: NodeSettings) -> tuple[list[np.ndarray], float, dict[str, Any]]:
    """A round inside secure aggregation: the update to mask, its weight, and the metrics."""
    if request.adapter is None:
        raise FedslmError("a secure aggregation round needs the global adapter in the request")
    state, metrics = client_train(request, node, secure=True)
    update, weight, extra = secure_payload(node_config(request, node), request.adapter, state,
                                           int(metrics["num-examples"]))
    return update, weight, {**metrics, **extra}


def client_evaluate(request: Request, node: NodeSettings) -> dict[str, Any]:
    started = time.perf_counter()
    cfg = node_config(request, node)
    _threads(cfg)
    inst = build_institution(cfg, node, request, for_training=False)
    ev = evaluate(inst.model, inst.test, cfg.model.task, cfg.train.eval_batch_size)
    return {"institution": node.institution, "unit-weight": 1, **{k.replace("_", "-"): v for k, v in ev.items()},
            "seconds": time.perf_counter() - started}
