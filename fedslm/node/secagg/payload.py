"""What a node masks in a SecAgg+ round: its update (or, under distributed noise, its noised lattice sums)
and its weight, as the FitRes reply Flower's mod masks."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping, Optional

import numpy as np
from flwr.app import Message, MetricRecord
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

from fedslm.errors import FedslmError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def secure_payload(sent: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], num_examples: int, *,
                   clipping_range: float, max_weight: float,
                   bit: Optional[int] = None) -> tuple[list[np.ndarray], float, dict[str, Any]]:
    """What a node masks: its update per tensor (in the order the coordinator sent them), then its
    clipped ``bit`` as one more coordinate when the layout has it (:func:`fedslm.wire.secagg.bit_in_sum`),
    its weight (at most ``max_weight``: 1 under client-level DP), and metrics saying how many
    coordinates the quantisation range clipped."""
    from fedslm.wire.secagg import bit_value

    limit = clipping_range
    update = [(state[k].double() - sent[k].double()).numpy() for k in sent]
    if bit is not None:
        update.append(bit_value(bit, clipping_range))
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


def lattice_payload(sent: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                    sums: Mapping[str, torch.Tensor], lattice: Any, *,
                    max_weight: float) -> tuple[list[np.ndarray], float, dict[str, Any]]:
    """What a node masks under distributed noise: its noised integer sums K as K·(2R/T), which Flower's
    quantiser maps exactly onto its levels (:mod:`fedslm.privacy.distributed`), in the order the
    coordinator sent the tensors; 0 for a tensor that was not trained (it must be unchanged). The
    weight is ``max_weight``, so that Flower scales nothing and the unmasked mean is ΣK·(2R/T)/count."""
    import torch

    from fedslm.privacy.distributed import to_wire

    update = []
    for key in sent:
        if key in sums:
            update.append(to_wire(sums[key], lattice).reshape(tuple(sent[key].shape)))
        else:
            if not torch.equal(state[key].to(sent[key].dtype), sent[key]):
                raise FedslmError("distributed noise: an adapter tensor outside the head changed in training")
            update.append(np.zeros(tuple(sent[key].shape), dtype=np.float64))
    if set(sums) - set(sent):
        raise FedslmError("distributed noise: the trained head is not among the tensors the coordinator sent")
    return update, float(max_weight), {"secagg-clipped": 0, "secagg-weight": float(max_weight)}


def masked_train_reply(msg: Message, update: list[np.ndarray], weight: float, metrics: Mapping[str, Any]) -> Message:
    """The reply Flower's ``secaggplus_mod`` masks: a FitRes of the update and weight, plus fedslm's metrics."""
    from fedslm.wire import codec

    fitres = FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(update),
                    num_examples=weight, metrics={})  # type: ignore[arg-type]
    content = compat.fitres_to_recorddict(fitres, keep_input=True)
    content[codec.METRICS] = MetricRecord(codec.metric_values(metrics))
    return Message(content, reply_to=msg)
