"""The one place Flower's record types meet the library: Message content <-> tensors and dataclasses.

A train or evaluate request carries the global adapter (``arrays``) and a
ConfigRecord with the resolved run config as YAML, the base fingerprint and
the round. A reply carries the adapter (train only) and a MetricRecord.
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
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
    # The global adapter, decoded: None until the node checked the record's keys, dtypes and shapes
    # against its own model (:func:`decode_adapter`); ``arrays`` is the record as it arrived.
    adapter: Optional[dict[str, torch.Tensor]]
    bytes_down: int
    # SHA-256 of the coordinator's frozen LoRA tensors (FFA-LoRA's shared A); '' when none.
    frozen_digest: str = ""
    # The bound to clip this round's update to (client-side client-level DP); None when not asked.
    clipping_norm: Optional[float] = None
    arrays: Optional[ArrayRecord] = None

    @property
    def sends_adapter(self) -> bool:
        return self.arrays is not None or self.adapter is not None


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
    """The request's config and the global adapter's metadata; no tensor is decoded here (see
    :func:`decode_adapter`, called once the node knows its model)."""
    try:
        request = _parse_request(msg)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise MalformedMessage(f"a request whose records cannot be read ({type(exc).__name__}: {exc})") from None
    if len(request.run_id) > MAX_RUN_ID:
        raise MalformedMessage(f"a run id of {len(request.run_id)} characters (at most {MAX_RUN_ID})")
    for name, value in (("proximal-mu", request.proximal_mu), ("clipping_norm", request.clipping_norm)):
        if value is not None and not math.isfinite(value):
            raise MalformedMessage(f"{name} must be a finite number, got {value}")
    return request


# What a global adapter's tensors may be sent as (numpy's names: Flower serialises with np.save).
FLOAT_DTYPES = ("float16", "float32", "float64")


def _layout(key: str, array: Any) -> tuple[tuple[int, ...], np.dtype]:
    """An array's declared shape and dtype, checked to be a float tensor, from its metadata alone."""
    if not isinstance(array, Array) or array.stype != "numpy.ndarray":
        raise MalformedMessage(f"adapter tensor {key} is not a serialised numpy array")
    if array.dtype not in FLOAT_DTYPES:
        raise MalformedMessage(f"adapter tensor {key} is not floating point")
    shape = tuple(array.shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise MalformedMessage(f"adapter tensor {key} declares a shape that is not one: {shape!r:.60}")
    return shape, np.dtype(array.dtype)


def adapter_layout(record: ArrayRecord) -> dict[str, tuple[int, ...]]:
    """The record's keys and declared shapes, each a float tensor (nothing is decoded)."""
    return {key: _layout(key, array)[0] for key, array in record.items()}


def decode_adapter(record: ArrayRecord, expected: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The global adapter as tensors, after its keys and shapes were found to be exactly ``expected``
    (the node's own model's adapter) from the record's metadata and each array's .npy header: an
    unknown key, a missing one or a wrong shape is refused before any tensor is materialised."""
    missing, unexpected = sorted(set(expected) - set(record)), sorted(set(record) - set(expected))
    if missing or unexpected:
        raise MalformedMessage(f"the adapter's keys do not match this round's model: missing {missing[:3]}, "
                               f"unexpected {[k[:80] for k in unexpected[:3]]}")
    checked = []
    for key, array in record.items():
        shape, dtype = _layout(key, array)
        if shape != tuple(expected[key]):
            raise MalformedMessage(f"adapter tensor {key}: shape {shape!r:.60}, expected {tuple(expected[key])}")
        # The bytes carry their own header (np.save): it must say what the metadata says, and the payload
        # must be exactly that many values, before np.load reads them.
        head = io.BytesIO(bytes(memoryview(array.data)[:65536]))
        try:
            version = np.lib.format.read_magic(head)
            header = (np.lib.format.read_array_header_1_0(head) if version == (1, 0)
                      else np.lib.format.read_array_header_2_0(head))
        except (ValueError, EOFError, SyntaxError, TypeError) as exc:
            raise MalformedMessage(f"adapter tensor {key}: unreadable .npy header ({type(exc).__name__})") from None
        size = math.prod(shape) * dtype.itemsize
        if header[0] != shape or header[2] != dtype or len(array.data) != head.tell() + size:
            raise MalformedMessage(f"adapter tensor {key}: its bytes do not hold a {array.dtype} array of shape "
                                   f"{shape}")
        checked.append(key)
    adapter = {key: torch.from_numpy(record[key].numpy()) for key in checked}
    for key, tensor in adapter.items():
        largest = float(tensor.abs().max()) if tensor.numel() else 0.0
        if not bool(torch.isfinite(tensor).all()) or largest > MAX_ADAPTER_VALUE:
            raise MalformedMessage(f"adapter tensor {key} holds values that are not finite or exceed "
                                   f"{MAX_ADAPTER_VALUE:g} in magnitude")
    return adapter


def _parse_request(msg: Message) -> Request:
    content = msg.content
    cfg = content[CONFIG] if CONFIG in content else ConfigRecord()
    arrays = None
    bytes_down = 0
    if ARRAYS in content:
        arrays = content[ARRAYS]
        if not isinstance(arrays, ArrayRecord):
            raise TypeError(f"'{ARRAYS}' is not an ArrayRecord")
        bytes_down = sum(math.prod(shape) * np.dtype(arrays[key].dtype).itemsize
                         for key, shape in adapter_layout(arrays).items())
    return Request(
        server_round=int(cfg.get("server-round", 0)),
        config_yaml=str(cfg.get("fedslm-config", "")),
        base_fingerprint=str(cfg.get("base-fingerprint", "")),
        run_id=str(cfg.get("run-id", "")),
        proximal_mu=float(cfg.get("proximal-mu", 0.0)),
        adapter=None,
        bytes_down=bytes_down,
        frozen_digest=str(cfg.get("frozen-digest", "")),
        clipping_norm=float(cfg[KEY_CLIPPING_NORM]) if KEY_CLIPPING_NORM in cfg else None,
        arrays=arrays,
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
