"""The SecAgg+ stages on the node: Flower's ``secaggplus_mod`` around fedslm's train handler, with the
node's checks before each stage and its record of the protocol after it."""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedslm.node.secagg.checks import check_stage
from fedslm.node.secagg.signatures import sign_setup, sign_survivors
from fedslm.node.secagg.state import COHORT, MASKED_WITH, PROTOCOL, SESSION, SETUP_VALUES, STATE, _own, _session
from fedslm.wire.errors import NODE_REFUSED, public_reason
from fedslm.wire.secagg import CONSISTENCY_STAGE, _mod_module

log = logging.getLogger(__name__)


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
        check_stage(msg, context)
        if stage == CONSISTENCY_STAGE:  # fedslm's own stage: Flower's mod never sees it
            return sign_survivors(msg, context)
        reply = _mod_module.secaggplus_mod(msg, context, train)
        if stage == Stage.SETUP and not reply.has_error():  # Flower holds this session's keys: so does fedslm
            configs = msg.content.config_records[RECORD_KEY_CONFIGS]
            setup = [float(configs[k]) for k in (Key.CLIPPING_RANGE, Key.TARGET_RANGE, Key.MOD_RANGE,  # type: ignore[arg-type]
                                                 Key.MAX_WEIGHT)]
            protocol = [int(configs[k]) for k in (Key.THRESHOLD, Key.SHARE_NUMBER, Key.SAMPLE_NUMBER)]  # type: ignore[arg-type]
            context.state.config_records[STATE] = ConfigRecord({SESSION: _session(msg), SETUP_VALUES: setup,
                                                                PROTOCOL: protocol})
            sign_setup(msg, reply, context)
        elif stage == Stage.SHARE_KEYS and not reply.has_error():  # Flower took the stage: remember the cohort
            own = context.state.config_records[STATE]
            neighbours = sorted(int(k) for k in msg.content.config_records[RECORD_KEY_CONFIGS].keys()
                                if k != Key.STAGE)
            context.state.config_records[STATE] = ConfigRecord({**dict(own), COHORT: neighbours})
        elif stage == Stage.COLLECT_MASKED_VECTORS and not reply.has_error():  # the masks it added
            sources = msg.content.config_records[RECORD_KEY_CONFIGS][Key.SOURCE_LIST]
            context.state.config_records[STATE] = ConfigRecord({
                **_own(context), MASKED_WITH: sorted({context.node_id, *(int(n) for n in sources)})})  # type: ignore[union-attr]
        return reply
    except _Refused as exc:
        return Message(error=exc.error, reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - a protocol violation: the details stay in this node's log
        log.warning("secure aggregation stage %s failed: %s", stage, exc)
        return Message(error=Error(code=NODE_REFUSED, reason=public_reason("secure-aggregation")), reply_to=msg)
