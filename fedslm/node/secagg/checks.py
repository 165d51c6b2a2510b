"""The node's checks on the coordinator's SecAgg+ stages, before Flower's mod acts on them: the protocol's
parameters at setup, its neighbours at key sharing (:mod:`fedslm.node.secagg.signatures`), the survivor
list it signs, and the unmask request against that list and the noise its sum must carry.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

from flwr.app import ConfigRecord, Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedslm.node.secagg.signatures import _listed, _raw, check_neighbours
from fedslm.node.secagg.state import (BOUND, COHORT, MASKED_WITH, NOISE_HONEST, NOISE_LATTICE, NOISE_NEED,
                                      NOISE_SHARE, PROTOCOL, SESSION, SIGNED, STATE, VERIFIED,
                                      SecureAggregationRefused, _full_policy, _own, _session, _threshold, cohort)
from fedslm.wire.secagg import CONSISTENCY_STAGE, MAX_SURVIVORS

log = logging.getLogger(__name__)


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
