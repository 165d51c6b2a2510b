"""The one place Flower's record types meet the library: Message content <-> tensors and dataclasses.

A train or evaluate request carries the global adapter (``arrays``) and a
ConfigRecord with the resolved run config as YAML, the base fingerprint and
the round. A reply carries the adapter (train only) and a MetricRecord.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedslm.errors import FedslmError

ARRAYS = "arrays"
# The value of a metric a deployed node does not release (every reply keeps the same metric keys).
WITHHELD = -1.0
# Every train reply carries this metric = 1, so FedAvg can average institutions unweighted.
UNIT_WEIGHT = "unit-weight"
CONFIG = "config"
METRICS = "metrics"


@dataclass(frozen=True)
class Request:
    server_round: int
    config_yaml: str
    base_fingerprint: str
    run_id: str
    proximal_mu: float
    adapter: Optional[dict[str, torch.Tensor]]
    bytes_down: int
    # SHA-256 of the coordinator's frozen LoRA tensors (FFA-LoRA's shared A); '' when none.
    frozen_digest: str = ""
    # The bound to clip this round's update to (client-side client-level DP); None when not asked.
    clipping_norm: Optional[float] = None


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, v.detach().cpu().contiguous()) for k, v in state.items()))


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def transfer(state: Mapping[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """``state`` as it travels: floating tensors cast to ``dtype`` (federation.transfer_dtype)."""
    target = getattr(torch, dtype)
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}


def transfer_record(record: ArrayRecord, dtype: str) -> ArrayRecord:
    if dtype == "float32":
        return record
    return state_to_record(transfer(record_to_state(record), dtype))


def tensor_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def request_config(config_yaml: str, base_fingerprint: str, run_id: str, frozen_digest: str = "") -> ConfigRecord:
    return ConfigRecord({"fedslm-config": config_yaml, "base-fingerprint": base_fingerprint, "run-id": run_id,
                         "frozen-digest": frozen_digest})


class MalformedMessage(FedslmError):
    """A message whose records do not have the types the contract says."""


# A global adapter coordinate larger than this is refused: honest adapters are orders of magnitude
# smaller, and huge weights could make a record's gradient overflow, so that whether the update comes
# back finite would depend on the data.
MAX_ADAPTER_VALUE = 1e4
# Longer run ids are refused: they are written into the node's ledger and release file names.
MAX_RUN_ID = 200


def parse_request(msg: Message) -> Request:
    try:
        request = _parse_request(msg)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise MalformedMessage(f"a request whose records cannot be read ({type(exc).__name__}: {exc})") from None
    if len(request.run_id) > MAX_RUN_ID:
        raise MalformedMessage(f"a run id of {len(request.run_id)} characters (at most {MAX_RUN_ID})")
    for name, value in (("proximal-mu", request.proximal_mu), ("clipping_norm", request.clipping_norm)):
        if value is not None and not math.isfinite(value):
            raise MalformedMessage(f"{name} must be a finite number, got {value}")
    if request.adapter is not None:
        for key, tensor in request.adapter.items():
            if not tensor.is_floating_point():
                raise MalformedMessage(f"adapter tensor {key} is not floating point")
            largest = float(tensor.abs().max()) if tensor.numel() else 0.0
            if not bool(torch.isfinite(tensor).all()) or largest > MAX_ADAPTER_VALUE:
                raise MalformedMessage(f"adapter tensor {key} holds values that are not finite or exceed "
                                       f"{MAX_ADAPTER_VALUE:g} in magnitude")
    return request


def _parse_request(msg: Message) -> Request:
    content = msg.content
    cfg = content[CONFIG] if CONFIG in content else ConfigRecord()
    adapter = None
    bytes_down = 0
    if ARRAYS in content:
        adapter = record_to_state(content[ARRAYS])
        bytes_down = tensor_bytes(adapter)
    return Request(
        server_round=int(cfg.get("server-round", 0)),
        config_yaml=str(cfg.get("fedslm-config", "")),
        base_fingerprint=str(cfg.get("base-fingerprint", "")),
        run_id=str(cfg.get("run-id", "")),
        proximal_mu=float(cfg.get("proximal-mu", 0.0)),
        adapter=adapter,
        bytes_down=bytes_down,
        frozen_digest=str(cfg.get("frozen-digest", "")),
        clipping_norm=float(cfg[KEY_CLIPPING_NORM]) if KEY_CLIPPING_NORM in cfg else None,
    )


def metric_values(metrics: Mapping[str, Any]) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            out[key] = int(value)
        elif isinstance(value, (int, float)):
            out[key] = value
    return out


def train_reply(msg: Message, state: Mapping[str, torch.Tensor], metrics: Mapping[str, Any]) -> Message:
    return Message(RecordDict({ARRAYS: state_to_record(state), METRICS: MetricRecord(metric_values(metrics))}),
                   reply_to=msg)


def evaluate_reply(msg: Message, metrics: Mapping[str, Any]) -> Message:
    return Message(RecordDict({METRICS: MetricRecord(metric_values(metrics))}), reply_to=msg)


def _value_bytes(value: Any) -> int:
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, (list, tuple)):
        return sum(_value_bytes(v) for v in value)
    return 8  # a number or a bool


def content_bytes(msg: Message) -> int:
    """Bytes a message's records carry: array payloads plus config and metric values."""
    total = 0
    for record in msg.content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(array.data) for array in record.values())
        else:
            total += sum(len(key) + _value_bytes(value) for key, value in record.items())
    return total


def reply_metrics(msg: Message) -> dict[str, Any]:
    return dict(msg.content[METRICS]) if METRICS in msg.content else {}


def reply_state(msg: Message) -> dict[str, torch.Tensor]:
    return record_to_state(msg.content[ARRAYS])
