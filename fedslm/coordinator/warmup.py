"""A simulation's institutions import their code while the coordinator builds its model.

Flower's simulation engine serves every institution's messages in a few long-lived Ray actors, which
import torch, transformers, PEFT and Opacus (several seconds each on 2 cores) when their first message
arrives; the ServerApp meanwhile imports the same modules and builds the initial model, and only then
sends round 1. :func:`start` sends every node a ``query.warmup`` message first, with no content
(fedslm.node.app answers it, in a simulation only, by importing its round code), so the two happen
at once; :func:`finish`, just before the first round, collects the replies (none is needed: an error
or a late reply only means the round pays for the imports itself). A deployed coordinator sends none:
a deployed node starts a fresh process per message and refuses the query.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional, Sequence

from flwr.app import Message, RecordDict

log = logging.getLogger("fedslm.coordinator")

MESSAGE_TYPE = "query.warmup"
# How long start() waits for the engine to register its simulated nodes (it does so as it starts, beside
# the ServerApp), and how long finish() waits for the replies before round 1 goes ahead regardless.
NODES_WAIT = 5.0
REPLIES_WAIT = 120.0


def start(grid: Any, *, simulation: bool, nodes_wait: float = NODES_WAIT) -> list[str]:
    """Push a warm-up message to every node of a simulation's ``grid``; returns their ids ([] outside a
    simulation, or when no node registers within ``nodes_wait`` seconds)."""
    if not simulation:
        return []
    deadline = time.monotonic() + nodes_wait
    nodes = list(grid.get_node_ids())
    while not nodes and time.monotonic() < deadline:
        time.sleep(0.01)
        nodes = list(grid.get_node_ids())
    if not nodes:
        return []
    messages = [Message(RecordDict(), dst_node_id=node, message_type=MESSAGE_TYPE) for node in nodes]
    return [mid for mid in grid.push_messages(messages) if mid]


def finish(grid: Any, ids: Sequence[str], timeout: Optional[float] = REPLIES_WAIT) -> int:
    """Collect the replies to :func:`start`'s messages on ``grid`` (a fedslm.coordinator.polling.PollingGrid),
    for at most ``timeout`` seconds; returns how many arrived (errors included)."""
    replies = grid.receive(ids, timeout=timeout)
    errors = sum(1 for reply in replies if reply.has_error())
    if errors:
        log.warning("fedslm: %d of %d institutions answered the warm-up with an error; their first round imports "
                    "its code itself", errors, len(ids))
    if len(replies) < len(ids):
        log.warning("fedslm: %d of %d institutions did not answer the warm-up in %.0f s; round 1 goes ahead",
                    len(ids) - len(replies), len(ids), timeout)
    return len(replies)
