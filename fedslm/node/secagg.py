"""The node's side of SecAgg+: Flower's ``secaggplus_mod`` around fedslm's train handler.

See :mod:`fedslm.wire.secagg` for the protocol and what fedslm changes in it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping, Optional

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from fedslm.errors import FedslmError
from fedslm.wire.errors import NODE_REFUSED, public_reason
from fedslm.wire.secagg import CONSISTENCY_STAGE, MAX_SURVIVORS, _mod_module

if TYPE_CHECKING:
    import torch

# Kept light on purpose (no torch, no models): a deployed node starts a fresh ClientApp process for
# every message, and four of the five stages (Flower's four and fedslm's consistency stage) need nothing but this mod.

log = logging.getLogger("fedslm.node.secagg")

# This node's own record of the protocol in its context: the cohort it shares its secrets with.
STATE = "fedslm-secagg"
COHORT = "cohort"
SESSION = "session"  # "run/group" of the protocol run this node set up last
MASKED_WITH = "masked-with"  # the nodes whose pairwise masks this node added (and itself)
VERIFIED = "verified"  # neighbours whose round keys a listed institution signed
BOUND = "bound"  # "node=institution" for each of them: the only key whose signature counts for that node
SIGNED = "signed"  # the survivor list this node signed in the consistency stage of the session
SETUP_VALUES = "setup-values"  # Flower's setup parameters: clipping range, levels, modulus, max weight
PROTOCOL = "protocol"  # the threshold, share count and cohort size this node accepted at setup
# Under distributed noise (fedslm.privacy.distributed), set when this node trained: its lattice's digest, the
# variance it added, the variance its plan needs in the sum, and the honest contributors it counts on.
NOISE_LATTICE, NOISE_SHARE, NOISE_NEED, NOISE_HONEST = "noise-lattice", "noise-share", "noise-need", "noise-honest"
# Per run, the last round this node set up and the survivor list it signed: on disk, fedslm.node.sessions.
_MAX_KEY_BYTES = 512  # a SecAgg+ public key (PEM) or an Ed25519 key/signature is far below this


class SecureAggregationRefused(FedslmError):
    """The coordinator's protocol parameters or stage messages are outside what this node accepts."""


def _full_policy(context: Context) -> Any:
    from fedslm.node.policy import NODE_POLICY, load_policy

    if NODE_POLICY not in context.node_config:
        return None  # simulation: only the protocol's own consistency checks
    return load_policy(str(context.node_config[NODE_POLICY]))


def _policy(context: Context) -> Any:
    full = _full_policy(context)
    return None if full is None else full.secure_aggregation


def _session(msg: Message) -> str:
    return f"{msg.metadata.run_id}/{msg.metadata.group_id}"


def check_stage(msg: Message, context: Context) -> None:
    """The node's checks on a SecAgg+ stage message, before Flower's mod acts on it.

    Setup: a cohort and a threshold the policy accepts, and more than half of the shares needed to
    rebuild a secret (else a coordinator could tell one half of the cohort that a node dropped and the
    other half that it is alive, and rebuild both of its secrets). Share keys: at least the policy's
    cohort of neighbours, each signed by an institution the policy lists (:func:`check_neighbours`),
    remembered. Consistency (:func:`check_survivors`): the survivor list it signs. Unmask: no node
    both alive and dropped (both of its secrets would be revealed), this node not among the dropped,
    every node one of its neighbours, and (:func:`check_unmask`) alive and dropped as in the list it
    signed, which more than half of its listed institutions signed too.
    """
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage = str(configs.get(Key.STAGE, "?"))
    full = _full_policy(context)
    policy = None if full is None else full.secure_aggregation
    if full is not None and msg.metadata.dst_node_id != context.node_id:
        raise SecureAggregationRefused(f"a stage addressed to node {msg.metadata.dst_node_id}, not this node")
    own = context.state.config_records.get(STATE)
    if stage != Stage.SETUP and own is not None and str(own.get(SESSION, "")) != _session(msg):
        raise SecureAggregationRefused(f"stage {stage} of protocol run {_session(msg)}, but this node set up "
                                       f"{own.get(SESSION)}")
    if stage == Stage.SETUP:
        sample, shares, threshold = (int(configs[k]) for k in (Key.SAMPLE_NUMBER, Key.SHARE_NUMBER, Key.THRESHOLD))
        if policy is not None:
            colluding = policy.max_colluding
            if 2 * threshold <= shares + colluding:
                raise SecureAggregationRefused(
                    f"threshold {threshold} of {shares} shares with up to {colluding} colluding institutions "
                    "(secure_aggregation.max_colluding): 2 x threshold must exceed shares + colluders, else a "
                    "coordinator could rebuild both secrets of one node from two parts of the cohort, the colluders "
                    "answering in both")
            if sample < policy.min_cohort or shares < policy.min_cohort:
                raise SecureAggregationRefused(f"cohort of {sample} with {shares} shares, below this node's "
                                               f"secure_aggregation.min_cohort={policy.min_cohort}")
            if full.privacy.assume_honest > 1 and shares < sample:
                raise SecureAggregationRefused(
                    f"{shares} shares in a cohort of {sample}: this node counts on others' noise "
                    "(privacy.assume_honest), which it can check only when every survivor is its neighbour "
                    "(federation.secagg.shares=1)")
            if threshold < policy.min_threshold:
                raise SecureAggregationRefused(f"threshold {threshold}, below this node's "
                                               f"secure_aggregation.min_threshold={policy.min_threshold}")
            try:
                group = int(msg.metadata.group_id)
            except ValueError:
                raise SecureAggregationRefused(f"a setup for round {msg.metadata.group_id!r}, not a round number") from None
            # On disk beside the ledger (it outlives a SuperNode restart), before Flower's mod runs: a setup
            # that fails there is not offered again either.
            from fedslm.node.sessions import SessionRecord, owner

            SessionRecord(full.privacy.ledger, owner(full)).set_up(int(msg.metadata.run_id), group)
    elif stage == Stage.SHARE_KEYS:
        neighbours = sorted(int(k) for k in configs.keys() if k != Key.STAGE)
        if policy is not None and len(neighbours) < policy.min_cohort:
            raise SecureAggregationRefused(f"{len(neighbours)} neighbours, below this node's "
                                           f"secure_aggregation.min_cohort={policy.min_cohort}")
        if policy is not None:
            verified = check_neighbours(msg, configs, policy,
                                        threshold=_threshold(own),
                                        required=full.privacy.require_secure_aggregation,
                                        need_checks=full.privacy.assume_honest > 1,
                                        agree=_agreement(own, full))
            if own is not None:
                context.state.config_records[STATE] = ConfigRecord({
                    **dict(own), VERIFIED: sorted(verified.values()),
                    BOUND: [f"{node}={name}" for name, node in sorted(verified.items())]})
    elif stage == CONSISTENCY_STAGE:
        if full is not None:
            check_survivors(msg, configs, context, full)
    elif stage == Stage.UNMASK:
        active = [int(n) for n in configs[Key.ACTIVE_NODE_ID_LIST]]  # type: ignore[union-attr]
        dead = [int(n) for n in configs[Key.DEAD_NODE_ID_LIST]]  # type: ignore[union-attr]
        if full is not None:
            check_unmask(msg, context, full, active, dead)
        both = sorted(set(active) & set(dead))
        if both:
            raise SecureAggregationRefused(f"nodes {both} are listed both alive and dropped")
        if msg.metadata.dst_node_id in dead:
            raise SecureAggregationRefused("this node, which is answering, is listed as dropped")
        known = set(cohort(context) or [])
        if known and not set(active + dead) <= known:
            raise SecureAggregationRefused("the unmask request names nodes outside this node's cohort")


def _threshold(own: Optional[Mapping[str, Any]]) -> int:
    """The threshold this node accepted at setup (2, the least, before any setup)."""
    return int(own[PROTOCOL][0]) if own is not None and PROTOCOL in own else 2  # type: ignore[index]


def _own(context: Context) -> dict[str, Any]:
    record = context.state.config_records.get(STATE)
    return dict(record) if record is not None else {}


def check_survivors(msg: Message, configs: ConfigRecord, context: Context, full: Any) -> None:
    """The survivor list this node signs: nodes whose masked vectors the coordinator says it holds.

    It names this node; each of its neighbours in it is one this node masked with (else, with a
    neighbour's shares withheld from this node and that neighbour later "dropped", a coordinator strips
    every pairwise mask of this node's vector); at least the threshold of those and the policy's
    ``min_cohort`` in all (the sum it is unmasked in); and it is the only list this node signs in
    the round (two lists are two stories about who dropped out).
    """
    own = _own(context)
    if MASKED_WITH not in own or COHORT not in own:
        raise SecureAggregationRefused("a survivor list before this node masked its update in this protocol run")
    from fedslm.wire import identity

    raw = configs.get(identity.SURVIVORS)
    if (not isinstance(raw, list) or not 0 < len(raw) <= MAX_SURVIVORS
            or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**64 for n in raw)):
        raise SecureAggregationRefused("the survivor list is not a list of node ids")
    survivors = sorted(set(int(n) for n in raw))
    if len(survivors) != len(raw):
        raise SecureAggregationRefused("the survivor list names a node twice")
    if context.node_id not in survivors:
        raise SecureAggregationRefused("the survivor list leaves out this node, which masked its update")
    masked = {int(n) for n in own[MASKED_WITH]}
    neighbours = {int(n) for n in own[COHORT]}
    unmasked = sorted((set(survivors) & neighbours) - masked)
    if unmasked:
        raise SecureAggregationRefused(f"the survivor list names neighbours {unmasked} whose shares this node never "
                                       "received: their masks are not in its vector")
    # The sum this node's update is unmasked in: survivors it masked with (the list's other members
    # could be made up or in another part of the graph), at least the threshold and min_cohort.
    needed = max(_threshold(own), full.secure_aggregation.min_cohort)
    if len(set(survivors) & masked) < needed:
        raise SecureAggregationRefused(f"{len(set(survivors) & masked)} survivors among the nodes this node masked "
                                       f"with, below max(threshold, secure_aggregation.min_cohort) = {needed}")
    # One list per signer, run and round, kept on disk (it outlives a restart): a second one is refused there.
    from fedslm.node.sessions import SessionRecord, owner

    SessionRecord(full.privacy.ledger, owner(full)).sign(int(msg.metadata.run_id), int(msg.metadata.group_id),
                                                         survivors)
    context.state.config_records[STATE] = ConfigRecord({**own, SIGNED: survivors})


def _listed(policy: Any) -> tuple[bytes, dict[bytes, str]]:
    """This institution's raw public key, and {raw public key: name} of the other institutions its policy lists."""
    from fedslm.wire import identity

    mine = identity.raw_public(identity.load_private(policy.identity_key).public_key())
    return mine, {raw: name for name, path in policy.peers.items() if (raw := identity.load_public(path)) != mine}


def check_unmask(msg: Message, context: Context, full: Any, active: list[int], dead: list[int]) -> None:
    """Shares only for the survivor list this node signed: the alive are in it, the dropped are not, and
    (with institutions listed) more than half of them signed that very list for this run and round."""
    from fedslm.wire import identity

    own = _own(context)
    if SIGNED not in own or COHORT not in own:
        raise SecureAggregationRefused("an unmask request, but this node signed no survivor list in this protocol run")
    survivors = [int(n) for n in own[SIGNED]]
    outside = sorted(set(active) - set(survivors))
    if outside:
        raise SecureAggregationRefused(f"nodes {outside} are listed alive but are not in the survivor list this "
                                       "node signed")
    listed_dead = sorted(set(dead) & set(survivors))
    if listed_dead:
        raise SecureAggregationRefused(f"nodes {listed_dead} are listed as dropped but are in the survivor list this "
                                       "node signed")
    policy = full.secure_aggregation
    if not policy.peers:
        return  # no institutions to count (check_neighbours warned, or refused when secure aggregation is required)
    mine, listed = _listed(policy)
    record = msg.content.config_records.get(identity.CONSISTENCY)
    signers: dict[Optional[str], int] = {None: context.node_id}  # this institution signed it
    # Under distributed noise: each signer's statement (lattice, share, need, honest).
    statements: dict[int, tuple[str, float, float, int]] = {}
    bound = {int(n): name for n, _, name in (str(e).partition("=") for e in own.get(BOUND, []))}
    for node in survivors:
        entry = record.get(str(node)) if record is not None and node != context.node_id else None
        if entry is None:
            continue
        try:
            values = [_raw(v) for v in entry]  # type: ignore[union-attr]
        except (TypeError, ValueError):
            continue
        if len(values) not in (2, 3):
            continue
        raw, signature, noise = values[0], values[1], (values[2] if len(values) == 3 else b"")
        name = listed.get(raw)
        if name is None or name in signers or (node in bound and bound[node] != name):
            continue  # a listed key signing for a node whose round keys another institution signed counts nothing
        if identity.verify(raw, signature, identity.survivors_bytes(msg.metadata.run_id, msg.metadata.group_id,
                                                                    node, survivors, noise)):
            signers[name] = node
            stated = identity.read_noise_statement(noise) if noise else None
            if stated is not None and node in bound:  # statements only from neighbours bound to their institution
                statements[node] = stated
    unsigned = sorted(set(int(n) for n in own.get(VERIFIED, [])) & set(active) - set(signers.values()))
    if unsigned:  # its mask seed would go out although it never vouched for this list
        raise SecureAggregationRefused(f"nodes {unsigned} are listed alive but did not sign the survivor list")
    # More than half of the listed institutions, counting colluders (who sign any list) on both sides.
    needed = (len(listed) + 1 + policy.max_colluding) // 2 + 1
    if len(signers) < needed:
        raise SecureAggregationRefused(
            f"{len(signers)} of the {len(listed) + 1} institutions this node lists signed its survivor list, "
            f"fewer than {needed} (more than half): the coordinator may have shown others another list")
    check_noise_shares(own, survivors, statements, context.node_id)
    log.info("secure aggregation: survivor list %s signed by %d of %d listed institutions", survivors, len(signers),
             len(listed) + 1)


def check_noise_shares(own: Mapping[str, Any], survivors: list[int],
                       statements: Mapping[int, tuple[str, float, float, int]], me: int) -> None:
    """Under distributed noise, before this node gives out any share: every vector in its sum (the survivors
    it masked with, and its own) must carry enough noise for its sender's plan, this node's and each
    neighbour's as it signed it, since this node's shares help unmask them. A node counting on k honest
    contributors needs its share plus the k - 1 smallest shares among *all* the other survivors (Flower
    unmasks one sum over them; 0 for a survivor with no statement bound to its institution) to make up its
    plan: whichever k - 1 others are honest, the sum holds that much. A survivor that stated noise on
    another lattice or other tensors makes the sum meaningless; and a node in a local-DP round unmasks no
    sum that holds a neighbour's distributed noise (the coordinator could otherwise ask one neighbour for
    local DP to get its shares unchecked)."""
    masked = {int(n) for n in own.get(MASKED_WITH, [])}
    in_sum = sorted(set(survivors) & masked | {me})
    if NOISE_LATTICE not in own:
        noisy = sorted(n for n in in_sum if n in statements)
        if noisy:
            raise SecureAggregationRefused(f"survivors {noisy} added distributed noise, but this node was asked for a "
                                           "local-DP round: it cannot vouch for their plans in this sum")
        return
    lattice = str(own[NOISE_LATTICE])
    other = sorted(n for n in in_sum if n in statements and statements[n][0] != lattice)
    if other:
        raise SecureAggregationRefused(f"survivors {other} added their noise on another lattice or other tensors "
                                       "than this node (different lattice_bits, clip norm, range or trained tensors)")
    everyone = sorted(set(survivors) | {me})
    shares = {n: statements[n][1] for n in everyone if n in statements}
    shares[me] = float(own[NOISE_SHARE])
    plans = {n: (s[2], s[3]) for n, s in statements.items() if n in in_sum and n != me}
    plans[me] = (float(own[NOISE_NEED]), int(own.get(NOISE_HONEST, 1)))
    for node, (need, honest) in sorted(plans.items()):
        if honest <= 1:
            continue  # it added its whole noise itself
        others = sorted(shares.get(n, 0.0) for n in everyone if n != node)
        whose = "this node's" if node == me else f"node {node}'s"
        if len(others) < honest - 1:
            raise SecureAggregationRefused(f"{len(everyone)} vectors in the sum, fewer than the {honest} honest "
                                           f"contributors {whose} distributed noise counts on")
        held = shares[node] + sum(others[:honest - 1])
        if held < need * (1 - 1e-9):
            raise SecureAggregationRefused(
                f"the noise shares the survivors signed add up to {held / need:.3g} of the variance {whose} plan "
                f"needs in the sum, counting on {honest} honest contributors: not unmasking")


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


def _raw(value: Any) -> bytes:
    """A key or signature as relayed: bytes of a sane length, never anything ``bytes()`` would expand."""
    if not isinstance(value, bytes) or not 0 < len(value) <= _MAX_KEY_BYTES:
        raise TypeError("not a key")
    return value


def _agreement(own: Any, full: Any) -> Optional[tuple[tuple[int, int, int], int, str]]:
    """What this node requires its neighbours to have signed at setup when it guards against colluders or
    counts on others' noise: its own (threshold, shares, cohort), at least its max_colluding, and the same
    listed institutions. None: no such requirement."""
    if not (full.secure_aggregation.max_colluding > 0 or full.privacy.assume_honest > 1):
        return None
    if not full.secure_aggregation.peers:
        return None  # check_neighbours refuses or warns: without peers nothing is verified
    if own is None or PROTOCOL not in own:  # never skip the comparison for want of a record: refuse
        raise SecureAggregationRefused("no record of this node's setup for this protocol run; not sharing secrets")
    mine, listed = _listed(full.secure_aggregation)
    from fedslm.wire import identity

    protocol = tuple(int(v) for v in own[PROTOCOL])
    return protocol, full.secure_aggregation.max_colluding, identity.listed_digest([mine, *listed])  # type: ignore[return-value]


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


def setup_values(context: Context) -> Optional[tuple[float, ...]]:
    """Flower's setup parameters this node's mod quantises with (clipping range, levels, modulus, max weight)."""
    values = _own(context).get(SETUP_VALUES)
    return tuple(float(v) for v in values) if values is not None else None  # type: ignore[union-attr]


def record_noise(context: Context, noise: Mapping[str, Any]) -> None:
    """Remember the distributed noise this node added in the round (signed with its survivor list)."""
    if noise:
        context.state.config_records[STATE] = ConfigRecord({**_own(context), NOISE_LATTICE: str(noise["lattice"]),
                                                            NOISE_SHARE: float(noise["share"]),
                                                            NOISE_NEED: float(noise["need"]),
                                                            NOISE_HONEST: int(noise["honest"])})


def cohort(context: Context) -> list[int] | None:
    """The neighbours this node shared its secrets with in the current round (None outside SecAgg+)."""
    record = context.state.config_records.get(STATE)
    return [int(n) for n in record[COHORT]] if record is not None and COHORT in record else None  # type: ignore[union-attr]


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


