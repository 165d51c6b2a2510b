"""This round's institution: its records (a deployed node's own file, a simulated institution's share
of the scenario's dataset), the base model its policy allows with the round's LoRA adapter, and the
request's global adapter decoded against that model and loaded into it. What the round then does with
them (train, mask, evaluate) is :mod:`fedslm.node.serve`'s.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import Any, Optional

import torch
from peft import PeftModel

from fedslm.data import TaskData, load_task_data
from fedslm.data.partition import Partition, institution_data, load_partitions, partition_indices, partitions_file
from fedslm.data.tasks import get_task
from fedslm.errors import FedslmError
from fedslm.lora import get_adapter_state, set_adapter_state, wrap
from fedslm.lora.adapter import frozen_digest
from fedslm.models import BaseModel, load_base
from fedslm.node.plan import BadRequest, PolicyRefusal, RoundPlan, check_memory
from fedslm.node.policy import PolicyError
from fedslm.train.node import Node
from fedslm.wire.codec import Request, decode_adapter


class FingerprintMismatch(FedslmError):
    pass


# A simulation's Ray actors serve every round of several institutions in one process: their shares
# of the scenario's dataset (read, partitioned, split) and token ids are the same each time, so they
# are kept (a deployed node's process serves one message and reads its file afresh).
# Bounded by entries: a share holds references to the scenario's records, its token ids ~10 MB per 48k
# records; a process may serve hundreds of simulated institutions (benchmarks/scale.py).
MAX_SHARES = 2048
_SHARES: dict[str, TaskData] = {}
_ENCODED: dict[tuple, tuple[Any, Any]] = {}
# The scenario's dataset and its partition into institutions, computed once for every institution the process serves.
_WHOLE: dict[str, tuple[TaskData, dict[str, list[Partition]]]] = {}


def _share(plan: RoundPlan) -> TaskData:
    fed = plan.partition
    assert fed is not None
    key = json.dumps([asdict(plan.data), asdict(fed), plan.institution, plan.model.task], sort_keys=True, default=str)
    if key not in _SHARES:
        group = fed.partition_column if fed.partitioner == "column" else None
        source = json.dumps([asdict(plan.data), plan.model.task, group], sort_keys=True, default=str)
        if source not in _WHOLE:
            _WHOLE.clear()
            _WHOLE[source] = (load_task_data(plan.data, plan.model.task, group_column=group), {})
        whole, partitions = _WHOLE[source]
        split = json.dumps(asdict(fed), sort_keys=True, default=str)
        if split not in partitions:
            partitions.clear()
            # A simulation's main process wrote the partition before Flower started (its feature cache folder).
            from fedslm.cachedir import cache_dir

            shared = load_partitions(partitions_file(cache_dir(), whole.dataset_id, fed), len(whole.train), fed)
            partitions[split] = shared if shared is not None else partition_indices(whole.train, fed)
        if len(_SHARES) >= MAX_SHARES:
            _SHARES.pop(next(iter(_SHARES)))
        _SHARES[key] = institution_data(whole, fed, plan.institution, plan.data.test_fraction,
                                        plan.data.split_seed, plan.data.max_test_records, partitions[split])
    return _SHARES[key]


def _encode(task, examples, base: BaseModel, max_length: int):
    key = (id(examples), str(base.path), max_length, task.name)
    hit = _ENCODED.get(key)
    if hit is not None and hit[0] is examples:  # the very list (kept alive by _SHARES), not a reused id
        return hit[1]
    enc = task.encode(examples, base.tokenizer, max_length)
    if any(examples is d.train or examples is d.test for d in _SHARES.values()):
        if len(_ENCODED) >= 2 * MAX_SHARES:
            _ENCODED.pop(next(iter(_ENCODED)))
        _ENCODED[key] = (examples, enc)
    return enc


def institution_task_data(plan: RoundPlan, *, for_training: bool = True) -> TaskData:
    if plan.partition is None:  # deployment: the node's own file, split as its policy says
        data = load_task_data(plan.data, plan.model.task)
    else:  # simulation: this institution's share of the scenario's dataset
        data = _share(plan)
    if for_training and plan.spec.dp.enabled and plan.spec.dp.delta is not None:
        n = len(data.train)
        if not plan.spec.dp.delta < 1.0 / n:
            raise PolicyError(f"{plan.name}: privacy.max_delta={plan.spec.dp.delta:g} is not below 1/n = {1.0 / n:.3g} "
                              f"for this node's {n} training records; a δ that large protects no one")
    if not for_training and len(data.test) < plan.min_test_records:
        raise PolicyError(f"{plan.name}: {len(data.test)} held-out records, fewer than this node's "
                          f"data.min_test_records={plan.min_test_records}; refusing to score")
    return data


# The last base + LoRA model this process built. A simulation's Ray actors serve many rounds and
# institutions in one process; loading the base again each time is most of a round's cost for a
# small model. Reuse is exact: the base is frozen (and fingerprinted), and every trainable tensor
# is overwritten from the request's adapter (set_adapter_state is strict about keys and shapes).
_LOADED: dict[str, tuple[BaseModel, PeftModel]] = {}


def node_device(plan: RoundPlan) -> torch.device:
    """This node's device (its policy's resources.device; in simulation, from federation.client_gpus). One
    this machine lacks is the node's own misconfiguration, refused before anything is loaded or charged."""
    from fedslm.train.device import DeviceError, resolve_device

    key = "resources.device" if plan.partition is None else "federation.client_gpus (a simulated institution's cuda)"
    try:
        return resolve_device(plan.device, key=key)
    except DeviceError as exc:
        raise PolicyError(f"{plan.name}: {exc}") from None


def _base_and_model(plan: RoundPlan, num_labels: Optional[int]) -> tuple[BaseModel, PeftModel]:
    device = node_device(plan)
    key = json.dumps([asdict(plan.model), asdict(plan.lora), plan.spec.seed, num_labels, str(device)], sort_keys=True)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = _load(plan, num_labels)
    return _LOADED[key]


def _load(plan: RoundPlan, num_labels: Optional[int]) -> tuple[BaseModel, PeftModel]:
    """The base (one the policy allows) and, if the round's memory estimate fits the policy's
    resources.max_memory_gb, its LoRA model: the adapter is allocated only after that check."""
    base = load_base(plan.model, num_labels)
    check_memory(plan, base.model, num_labels, base.target_modules)
    return base, wrap(base.model, plan.lora, plan.model.task, base.target_modules, seed=plan.spec.seed,
                      device=node_device(plan))


def _num_labels(data: TaskData) -> Optional[int]:
    return len(data.labels) if data.labels is not None else None


def with_adapter(plan: RoundPlan, request: Request, data: TaskData) -> Request:
    """``request`` with its global adapter decoded, once the record's keys, dtypes and shapes were checked
    against this round's model from its metadata (fedslm.wire.codec.decode_adapter): a tensor under a
    key the model does not have, or of another shape, is refused before it is materialised."""
    if request.adapter is not None or request.arrays is None:
        return request
    _, model = _base_and_model(plan, _num_labels(data))
    expected = {k: tuple(v.shape) for k, v in get_adapter_state(model).items()}
    return replace(request, adapter=decode_adapter(request.arrays, expected))


def build_institution(plan: RoundPlan, request: Request, *, for_training: bool = True,
                      data: Optional[TaskData] = None) -> Node:
    data = data if data is not None else institution_task_data(plan, for_training=for_training)
    num_labels = _num_labels(data)
    if request.sends_adapter:
        base, model = _base_and_model(plan, num_labels)
        request = with_adapter(plan, request, data)
    else:
        base, model = _load(plan, num_labels)
    if plan.allowed_fingerprints is not None and base.fingerprint not in plan.allowed_fingerprints:
        raise PolicyRefusal(f"{plan.name}: base model fingerprint {base.fingerprint[:12]} is not in this node's "
                            "models.fingerprints")
    if request.base_fingerprint and request.base_fingerprint != base.fingerprint:
        raise FingerprintMismatch(
            f"{plan.name}: base model fingerprint {base.fingerprint[:12]} differs from the coordinator's "
            f"{request.base_fingerprint[:12]} (different model.name, label set, model.init_seed or model.pooling)"
        )
    if request.frozen_digest != frozen_digest(model):
        raise FingerprintMismatch(
            f"{plan.name}: the frozen LoRA A (lora.ffa) differs from the coordinator's "
            f"({frozen_digest(model)[:12] or 'none'} vs {request.frozen_digest[:12] or 'none'}): different "
            "lora settings, train.seed or library versions")
    task = get_task(plan.model.task)
    if request.adapter is not None:
        try:
            set_adapter_state(model, request.adapter)
        except (KeyError, ValueError) as exc:
            raise BadRequest(f"the request's adapter does not fit this round's model: {exc}") from None
        for p in model.parameters():  # nothing of an earlier round may leak into this one
            p.grad = None
    # Evaluation needs only the held-out records; tokenizing the training split would be wasted time.
    train = _encode(task, data.train, base, plan.model.max_length) if for_training else task.encode(
        [], base.tokenizer, plan.model.max_length)
    return Node(data, base, model, train, _encode(task, data.test, base, plan.model.max_length))
