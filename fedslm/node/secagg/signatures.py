"""Institutions' signatures in SecAgg+: this node signs its round keys and the survivor list it checked,
and verifies its neighbours' (each neighbour bound to one institution its policy lists).

The message formats are :mod:`fedslm.wire.identity`'s; what the signatures protect against is in
:mod:`fedslm.wire.secagg`.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedslm.node.secagg.state import (NOISE_HONEST, NOISE_LATTICE, NOISE_NEED, NOISE_SHARE, SIGNED,
                                      SecureAggregationRefused, _own, _policy)

log = logging.getLogger(__name__)

_MAX_KEY_BYTES = 512  # a SecAgg+ public key (PEM) or an Ed25519 key/signature is far below this


def _listed(policy: Any) -> tuple[bytes, dict[bytes, str]]:
    """This institution's raw public key, and {raw public key: name} of the other institutions its policy lists."""
    from fedslm.wire import identity

    mine = identity.raw_public(identity.load_private(policy.identity_key).public_key())
    return mine, {raw: name for name, path in policy.peers.items() if (raw := identity.load_public(path)) != mine}


def _raw(value: Any) -> bytes:
    """A key or signature as relayed: bytes of a sane length, never anything ``bytes()`` would expand."""
    if not isinstance(value, bytes) or not 0 < len(value) <= _MAX_KEY_BYTES:
        raise TypeError("not a key")
    return value


def check_neighbours(msg: Message, configs: ConfigRecord, policy: Any, *, threshold: int = 2,
                     required: bool = False, need_checks: bool = False,
                     agree: Optional[tuple[tuple[int, int, int], int, str]] = None) -> dict[str, int]:
    """Every neighbour's round keys signed by an institution the policy lists, each institution on one
    node only. Unverified neighbours: at most ``max_unverified_share`` of them, and fewer than
    ``threshold - 1`` (with that many of its own, plus this node's share, a coordinator holds a
    threshold of this node's shares). ``required``: the node requires secure aggregation, which
    without listed peers protects nothing against the coordinator: refused."""
    from fedslm.wire import identity

    me = msg.metadata.dst_node_id
    others = sorted(int(k) for k in configs.keys() if k != Key.STAGE and int(k) != me)
    if not policy.peers:
        if required:
            raise SecureAggregationRefused("privacy.require_secure_aggregation is set but secure_aggregation.peers "
                                           "lists no institution: this node cannot tell real neighbours from made-up ones")
        log.warning("secure aggregation: no secure_aggregation.peers listed; this node cannot tell its %d neighbours "
                    "from ones the coordinator made up", len(others))
        return {}
    _, listed = _listed(policy)
    record = msg.content.config_records.get(identity.PEERS)
    seen: dict[str, int] = {}
    unverified = []
    unchecking = []
    disagreeing = []
    for node in others:
        entry = record.get(str(node)) if record is not None else None
        try:
            values = [_raw(v) for v in entry]  # type: ignore[union-attr]
            pk1, pk2 = (_raw(v) for v in configs[str(node)])  # type: ignore[union-attr]
            if len(values) not in (2, 3):
                raise ValueError("not a signed identity")
        except (TypeError, ValueError):
            unverified.append(node)
            continue
        raw, signature, extra = values[0], values[1], (values[2] if len(values) == 3 else b"")
        name = listed.get(raw)
        message = identity.signed_bytes(msg.metadata.run_id, msg.metadata.group_id, node, pk1, pk2, extra)
        if name is None or not identity.verify(raw, signature, message):
            unverified.append(node)
            continue
        if name in seen:
            raise SecureAggregationRefused(f"institution {name!r} signed the keys of two nodes ({seen[name]} and {node})")
        seen[name] = node
        stated = identity.read_setup_statement(extra) if extra else None
        if stated is None or not stated["checks"]:
            unchecking.append(name)
        if agree is not None and (stated is None or (stated["t"], stated["n"], stated["s"]) != agree[0]
                                  or stated["c"] < agree[1] or stated["listed"] != agree[2]):
            disagreeing.append(name)
    log.info("secure aggregation: neighbours verified as %s; %d unverified", sorted(seen), len(unverified))
    if disagreeing:
        raise SecureAggregationRefused(
            f"institutions {sorted(disagreeing)} signed another threshold, share count or cohort than this node's "
            "setup, fewer colluders (secure_aggregation.max_colluding) or other listed institutions: they hold "
            "this node's secrets and must enforce at least its bounds")
    if need_checks and unchecking:
        raise SecureAggregationRefused(
            f"institutions {sorted(unchecking)} did not sign that they check distributed-noise plans before they "
            "unmask (their policies list no peers): this node counts on others' noise (privacy.assume_honest) and "
            "masks only with neighbours that do")
    # Unverified neighbours plus the colluders (max_colluding) plus this node's own share must stay below the
    # threshold, or the coordinator would hold one of this node's secrets.
    if threshold - 2 - policy.max_colluding < 0:
        raise SecureAggregationRefused(f"threshold {threshold} with secure_aggregation.max_colluding="
                                       f"{policy.max_colluding}: the colluders and this node's own share reach it")
    allowed = min(policy.max_unverified_share * len(others), threshold - 2 - policy.max_colluding)
    if unverified and len(unverified) > allowed:
        raise SecureAggregationRefused(
            f"{len(unverified)} of {len(others)} neighbours ({unverified}) carry no signature of an institution in "
            f"secure_aggregation.peers, more than max_unverified_share={policy.max_unverified_share} and threshold "
            f"{threshold} allow: a coordinator could have made them up to unmask this node's update")
    return seen


def sign_setup(msg: Message, reply: Message, context: Context) -> None:
    """Add this institution's signature over its round keys to a setup reply (when its policy has an identity)."""
    policy = _policy(context)
    if policy is None or not policy.identity_key or reply.has_error():
        return
    from fedslm.wire import identity

    keys = reply.content.config_records[RECORD_KEY_CONFIGS]
    # With peers listed and no unverified neighbour allowed, every neighbour is bound to its institution, so
    # the node reads and checks every neighbour's noise statement at unmask: only then it promises so (with
    # unverified neighbours allowed, a coordinator could strip a node's identity and have it go unchecked).
    # Beside it, the protocol it accepted, its collusion bound and its institutions, for its neighbours to compare.
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    mine, listed = _listed(policy)
    extra = identity.setup_statement(
        checks=bool(policy.peers) and policy.max_unverified_share == 0, threshold=int(configs[Key.THRESHOLD]),
        shares=int(configs[Key.SHARE_NUMBER]), sample=int(configs[Key.SAMPLE_NUMBER]),
        colluding=policy.max_colluding, listed=identity.listed_digest([mine, *listed]))
    message = identity.signed_bytes(msg.metadata.run_id, msg.metadata.group_id, context.node_id,
                                    bytes(keys[Key.PUBLIC_KEY_1]), bytes(keys[Key.PUBLIC_KEY_2]),  # type: ignore[arg-type]
                                    extra)
    raw, signature = identity.sign(identity.load_private(policy.identity_key), message)
    reply.content.config_records[identity.IDENTITY] = ConfigRecord({
        identity.KEY: raw, identity.SIGNATURE: signature, **({identity.STATEMENT: extra} if extra else {})})


def sign_survivors(msg: Message, context: Context) -> Message:
    """The consistency stage's reply: this institution's signature over the list it checked (none without
    an identity key; simulated nodes and nodes without one answer with an empty record)."""
    from fedslm.wire import identity

    survivors = _own(context).get(SIGNED)
    if survivors is None:  # a simulated node (no policy): nothing was checked, nothing to sign
        return Message(RecordDict({identity.CONSISTENCY: ConfigRecord()}), reply_to=msg)
    policy = _policy(context)
    record = ConfigRecord()
    if policy is not None and policy.identity_key:
        own = _own(context)
        noise = (identity.noise_statement(str(own[NOISE_LATTICE]), float(own[NOISE_SHARE]),  # type: ignore[arg-type]
                                          float(own[NOISE_NEED]), int(own[NOISE_HONEST]))  # type: ignore[arg-type]
                 if NOISE_LATTICE in own else b"")
        message = identity.survivors_bytes(msg.metadata.run_id, msg.metadata.group_id, context.node_id,
                                           [int(n) for n in survivors], noise)
        raw, signature = identity.sign(identity.load_private(policy.identity_key), message)
        record = ConfigRecord({identity.KEY: raw, identity.SIGNATURE: signature, **({identity.STATEMENT: noise} if noise else {})})
    return Message(RecordDict({identity.CONSISTENCY: record}), reply_to=msg)
