"""The node's side of SecAgg+: Flower's ``secaggplus_mod`` around fedslm's train handler.

See :mod:`fedslm.wire.secagg` for the protocol and what fedslm changes in it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
from flwr.app import Context, Error, Message, MessageType, MetricRecord
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat

from fedslm.errors import FedslmError
from fedslm.wire.errors import NODE_REFUSED, public_reason
from fedslm.wire.secagg import _mod_module

if TYPE_CHECKING:
    import torch

# Kept light on purpose (no torch, no models): a deployed node starts a fresh ClientApp process for
# every message, and three of SecAgg+'s four stages need nothing but this mod.

log = logging.getLogger("fedslm.node.secagg")




def in_protocol(msg: Message) -> bool:
    return msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records


class _Refused(Exception):
    def __init__(self, error: Error):
        super().__init__(error.reason)
        self.error = error


def secure_aggregation_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's ``secaggplus_mod`` for train messages that carry the protocol; others pass through.

    A failure in any stage (or a refusal of the training itself) goes back as an error reply with
    its reason, which the coordinator logs against this node; the protocol treats it as a dropout.
    """
    if not in_protocol(msg):
        return call_next(msg, context)
    stage = str(msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, "?"))

    def train(inner: Message, ctx: Context) -> Message:
        reply = call_next(inner, ctx)
        if reply.has_error():
            raise _Refused(reply.error)
        return reply

    try:
        return _mod_module.secaggplus_mod(msg, context, train)
    except _Refused as exc:
        return Message(error=exc.error, reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - a protocol violation: the details stay in this node's log
        log.warning("secure aggregation stage %s failed: %s", stage, exc)
        return Message(error=Error(code=NODE_REFUSED, reason=public_reason("secure-aggregation")), reply_to=msg)


def secure_payload(sent: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], num_examples: int, *,
                   clipping_range: float, max_weight: float) -> tuple[list[np.ndarray], float, dict[str, Any]]:
    """What a node masks: its update per tensor (in the order the coordinator sent them), its weight
    (at most ``max_weight``: 1 under client-level DP), and metrics saying how many coordinates the
    quantisation range clipped."""
    limit = clipping_range
    update = [(state[k].double() - sent[k].double()).numpy() for k in sent]
    clipped = int(sum(int((np.abs(u) > limit).sum()) for u in update))
    if not all(np.isfinite(u).all() for u in update):
        raise FedslmError("the update holds NaN or inf; it would poison the masked sum, so it is not sent")
    if clipped:
        log.warning("secure aggregation: %d update coordinates exceed federation.secagg.clipping_range=%s and are "
                    "clipped", clipped, limit)
    bound = max_weight
    weight = min(float(num_examples), bound)
    if num_examples > bound and bound > 1:
        log.warning("secure aggregation: %s training records count as federation.secagg.max_weight=%s",
                    num_examples, bound)
    return update, weight, {"secagg-clipped": clipped, "secagg-weight": weight}


def masked_train_reply(msg: Message, update: list[np.ndarray], weight: float, metrics: Mapping[str, Any]) -> Message:
    """The reply Flower's ``secaggplus_mod`` masks: a FitRes of the update and weight, plus fedslm's metrics."""
    from fedslm.wire import codec

    fitres = FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(update),
                    num_examples=weight, metrics={})  # type: ignore[arg-type]
    content = compat.fitres_to_recorddict(fitres, keep_input=True)
    content[codec.METRICS] = MetricRecord(codec.metric_values(metrics))
    return Message(content, reply_to=msg)


