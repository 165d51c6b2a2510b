"""Turning anything that goes wrong on a node into an error reply that says nothing about the node.

The full exception goes to the node's own log (``fedslm.node``), where its operator reads it; the
reply carries only a category and that category's fixed reason (:mod:`fedslm.wire.errors`).
"""

from __future__ import annotations

import logging

from flwr.app import Error

from fedslm.errors import BudgetExceededError, ConfigError, DataError, ModelError
from fedslm.node.clipping import ClippingMismatch
from fedslm.node.plan import BadRequest, PolicyRefusal
from fedslm.node.policy import PolicyError
from fedslm.node.secagg import SecureAggregationRefused
from fedslm.node.serve import FingerprintMismatch, SecureAggregationRequired
from fedslm.privacy.ledger import LedgerError
from fedslm.train.lpft import ProbeAdapterError
from fedslm.wire.codec import MalformedMessage
from fedslm.wire.errors import NODE_REFUSED, public_reason

log = logging.getLogger("fedslm.node")

# Most specific first: PolicyError is a ConfigError (the node's own config), so it comes before it.
_CATEGORIES: tuple[tuple[type[BaseException], str], ...] = (
    (BudgetExceededError, "budget-exhausted"),
    (PolicyRefusal, "refused-by-policy"),
    (SecureAggregationRequired, "refused-by-policy"),
    (SecureAggregationRefused, "secure-aggregation"),
    (BadRequest, "bad-request"),
    (ProbeAdapterError, "bad-request"),
    (ClippingMismatch, "bad-request"),
    (MalformedMessage, "bad-request"),
    (FingerprintMismatch, "base-mismatch"),
    (PolicyError, "node-misconfigured"),
    (LedgerError, "node-misconfigured"),
    (DataError, "node-misconfigured"),
    (ModelError, "node-misconfigured"),
    # A config error past the request's parsing comes from what the request asked of this node's data
    # (a label set, a batch larger than the records, a target ε the plan cannot reach).
    (ConfigError, "bad-request"),
)


def category(exc: BaseException) -> str:
    for kind, name in _CATEGORIES:
        if isinstance(exc, kind):
            return name
    return "internal"


def refusal(exc: BaseException, phase: str) -> Error:
    """The error reply for ``exc``; logs the details (with a traceback for what no category names)."""
    cat = category(exc)
    if cat == "internal":
        log.exception("node %s failed [internal]", phase)
    else:
        log.warning("node refused %s [%s]: %s", phase, cat, exc)
    return Error(code=NODE_REFUSED, reason=public_reason(cat))
