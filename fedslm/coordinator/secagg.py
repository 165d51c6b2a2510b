"""The coordinator's side of SecAgg+: Flower's ``SecAggPlusWorkflow`` stages under fedslm's rounds.

See :mod:`fedslm.wire.secagg` for the protocol and what fedslm changes in it.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from fedslm.config import Config
from fedslm.coordinator.screen import check_update, default_max_update_norm
from fedslm.wire import codec, identity
from fedslm.wire.errors import NODE_REFUSED
from fedslm.wire.secagg import (CLIPPED_COUNT, CONSISTENCY_STAGE, MODULUS, _workflow_module, bit_in_sum, max_weight,
                                quantization_range, quantization_step)

log = logging.getLogger("fedslm.coordinator.secagg")




class _Node(ClientProxy):
    """The workflow's handle on a node: only its id is ever used."""

    def __init__(self, node_id: int):
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, ins, timeout, group_id):  # pragma: no cover - never called
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError


class _Round:
    """The legacy strategy the workflow calls: the round's nodes in, the unmasked average out."""

    def __init__(self, node_ids: list[int]):
        self.node_ids = node_ids
        self.average: Optional[list[np.ndarray]] = None
        self.contributors: list[int] = []

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any):
        return [(_Node(n), FitIns(parameters=Parameters(tensors=[], tensor_type=""), config={})) for n in self.node_ids]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]):
        if results:
            self.average = parameters_to_ndarrays(results[0][1].parameters)
            self.contributors = [proxy.node_id for proxy, _ in results]
        return None, {}


class _StageGrid:
    """The grid as the workflow sees it: logs every failed or missing reply with its stage and node,
    and checks masked vectors before they enter the sum."""

    def __init__(self, grid: Any, recorder: Any, server_round: int, shapes: list[tuple[int, ...]], max_bytes: int):
        self.grid = grid
        self.recorder = recorder
        self.server_round = server_round
        self.shapes = [()] + shapes  # the weight factor comes first
        self.max_bytes = max_bytes
        self.collected: dict[int, Message] = {}
        self.bytes_up: dict[int, int] = {}
        self.failed: set[int] = set()
        self.identities: dict[int, list[bytes]] = {}  # node -> [public identity key, signature over its round keys]
        self.shared_nothing: set[int] = set()  # lost at setup or share keys: no node holds shares of its secrets
        self.survivors: list[int] = []  # the list every survivor was asked to sign in the consistency stage
        self.signed: dict[int, list[bytes]] = {}  # node -> [public identity key, signature over the survivors]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def _check_masked(self, reply: Message) -> Optional[str]:
        size = codec.content_bytes(reply)
        if size > self.max_bytes:
            return f"oversized masked vector: {size} bytes, limit {self.max_bytes}"
        try:
            blobs = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
            arrays = [bytes_to_ndarray(b) for b in blobs]  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - anything unreadable is a bad vector
            return f"unreadable masked vector ({exc})"
        got = [tuple(a.shape) for a in arrays]
        if got != [tuple(s) if s != () else (1,) for s in self.shapes]:
            return f"masked vector of shapes {got[:3]}... does not match the adapter's"
        if not all(np.issubdtype(a.dtype, np.integer) for a in arrays):
            return "masked vector is not integer"
        return None

    def agree(self, survivors: Iterable[int], server_round: int, timeout: Optional[float]) -> None:
        """fedslm's consistency stage, between collect and unmask: every node whose masked vector entered
        the sum is asked to sign the one list of survivors; the signatures go with every unmask request."""
        self.survivors = sorted(int(n) for n in survivors)
        self.send_and_receive([Message(content=RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({
            Key.STAGE: CONSISTENCY_STAGE, identity.SURVIVORS: list(self.survivors)})}), dst_node_id=n,
            message_type=MessageType.TRAIN, group_id=str(server_round)) for n in self.survivors], timeout=timeout)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> list[Message]:
        messages = list(messages)
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]) if messages else "?"
        if stage == Stage.UNMASK:  # every survivor's signature over the one list, to each survivor
            signed = ConfigRecord({identity.SURVIVORS: list(self.survivors),
                                   **{str(n): v for n, v in sorted(self.signed.items())}})
            for msg in messages:
                msg.content.config_records[identity.CONSISTENCY] = signed
        if stage == Stage.SHARE_KEYS:  # relay each neighbour's signed identity beside its keys
            for msg in messages:
                configs = msg.content.config_records[RECORD_KEY_CONFIGS]
                msg.content.config_records[identity.PEERS] = ConfigRecord({
                    k: self.identities[int(k)] for k in configs.keys() if k != Key.STAGE and int(k) in self.identities})
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        answered = set()
        kept = []
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            reason = None
            if reply.has_error():
                reason = reply.error.reason or f"error code {reply.error.code}"
            elif stage == Stage.SETUP and (signed := _signature(reply, identity.IDENTITY)) is not None:
                self.identities[node] = signed  # else relayed as missing: its neighbours decide
            elif stage == CONSISTENCY_STAGE and (signed := _signature(reply, identity.CONSISTENCY)) is not None:
                self.signed[node] = signed
            elif stage == Stage.COLLECT_MASKED_VECTORS:
                reason = self._check_masked(reply)
                if reason is None:
                    self.collected[node] = reply
                    self.bytes_up[node] = codec.content_bytes(reply)
            if reason is not None:
                self.failed.add(node)
                if stage in (Stage.SETUP, Stage.SHARE_KEYS):
                    self.shared_nothing.add(node)
                self.recorder.error(self.server_round, f"train/secagg-{stage}", node, reason)
                reply = Message(error=Error(code=NODE_REFUSED, reason=reason), reply_to=_as_sent(reply, messages))
            kept.append(reply)
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in answered:
                self.failed.add(node)
                if stage in (Stage.SETUP, Stage.SHARE_KEYS):
                    self.shared_nothing.add(node)
                self.recorder.error(self.server_round, f"train/secagg-{stage}", node, "no reply in time (dropped out)")
        return kept


def _signature(reply: Message, record: str) -> Optional[list[bytes]]:
    """[public identity key, signature] from a node's reply record, if it holds two bytes values of a sane size
    (and, when it signed a statement beside them, the statement as a third)."""
    signed = reply.content.config_records.get(record)
    if signed is None:
        return None
    key, signature = signed.get(identity.KEY), signed.get(identity.SIGNATURE)
    if isinstance(key, bytes) and isinstance(signature, bytes) and len(key) + len(signature) <= 1024:
        statement = signed.get(identity.STATEMENT)
        return ([key, signature, statement] if isinstance(statement, bytes) and 0 < len(statement) <= 512
                else [key, signature])
    return None


def _forget_early_losses(state: Any, lost: set[int]) -> None:
    """Take nodes lost before they sent any share out of the workflow's cohort. Flower 1.42 counts
    every sampled node that is not alive at the end as dropped after masking: it would ask its
    neighbours for shares of it that they never got (each fails the stage) and try to remove masks
    with it that no node added."""
    state.sampled_node_ids -= lost
    for node in list(state.nid_to_neighbours):
        if node in lost:
            del state.nid_to_neighbours[node]
        else:
            state.nid_to_neighbours[node] -= lost


def _as_sent(reply: Message, sent: list[Message]) -> Message:
    """The message ``reply`` answers (so a replacement error reply names the same node)."""
    for msg in sent:
        if msg.metadata.dst_node_id == reply.metadata.src_node_id:
            return msg
    raise KeyError(f"a reply from node {reply.metadata.src_node_id}, which was sent nothing")


class SecureAggregationGrid:
    """A grid whose train rounds run SecAgg+; everything else passes through to ``grid``.

    The strategy gets one reply per node whose masked update made it into the sum: each carries
    that node's metrics and, as its arrays, the same unmasked average (global + mean update), so
    the strategy's average of them is that average.
    """

    def __init__(self, grid: Any, cfg: Config, recorder: Any):
        self.grid = grid
        self.cfg = cfg
        self.recorder = recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> list[Message]:
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return list(self.grid.send_and_receive(messages, timeout=timeout))
        return self._secure_round(messages, timeout)

    def _workflow(self, timeout: Optional[float]) -> Any:
        sa = self.cfg.federation.secagg
        return _workflow_module.SecAggPlusWorkflow(
            num_shares=float(sa.shares), reconstruction_threshold=float(sa.threshold),
            max_weight=max_weight(self.cfg), clipping_range=float(sa.clipping_range),
            quantization_range=quantization_range(self.cfg), modulus_range=MODULUS, timeout=timeout)

    def _secure_round(self, messages: list[Message], timeout: Optional[float]) -> list[Message]:
        first = messages[0].content
        server_round = int(first[codec.CONFIG]["server-round"])
        sent = first[codec.ARRAYS]
        names = list(sent.keys())
        globals_ = [sent[k].numpy() for k in names]
        shapes = [tuple(a.shape) for a in globals_]
        with_bit = bit_in_sum(self.cfg)
        if with_bit:
            shapes.append((1,))
        numel = sum(a.size for a in globals_)
        # A masked vector is int64 per coordinate; allow twice that plus 1 MiB of keys and metrics.
        stage_grid = _StageGrid(self.grid, self.recorder, server_round, shapes, 2 * 8 * numel + 2**20)
        plan = _Round([m.metadata.dst_node_id for m in messages])
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                                strategy=plan)  # type: ignore[arg-type]
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        workflow = self._workflow(timeout)
        state = _workflow_module.WorkflowState()
        stages = [("setup", workflow.setup_stage), ("share-keys", workflow.share_keys_stage),
                  ("collect-masked-vectors", workflow.collect_masked_vectors_stage),
                  ("unmask", workflow.unmask_stage)]
        for name, stage in stages:
            if name == "collect-masked-vectors":  # each node's own copy: the workflow writes into it
                state.nid_to_fitins = {m.metadata.dst_node_id: RecordDict({
                    codec.ARRAYS: sent, codec.CONFIG: ConfigRecord(dict(m.content[codec.CONFIG]))}) for m in messages}
            if name == "unmask":  # fedslm's consistency stage first: one signed list of survivors
                honest = self.cfg.privacy.distributed.honest
                if self.cfg.federation.secagg.distributed_noise and len(state.active_node_ids) < honest:
                    # Simulated nodes run no checks of their own (the scenario stands for their policies): the
                    # sum of fewer than `honest` vectors would not carry the noise their ledgers charge for.
                    self.recorder.stop(server_round, "train", f"distributed noise: {len(state.active_node_ids)} "
                                       f"vectors in the sum, fewer than privacy.distributed.honest={honest}; "
                                       "not unmasking")
                stage_grid.agree(state.active_node_ids, server_round, timeout)
            ok = stage(stage_grid, context, state)
            if name in ("setup", "share-keys"):
                _forget_early_losses(state, stage_grid.shared_nothing)
                ok = ok and len(state.sampled_node_ids) >= state.threshold
            if not ok:
                self.recorder.stop(server_round, "train", f"secure aggregation halted at stage {name}: too few "
                                   f"institutions left to unmask (each needs {state.threshold} live neighbours; "
                                   f"federation.secagg.threshold)")
        if plan.average is None:
            self.recorder.stop(server_round, "train", "secure aggregation produced no sum")
        clipped_count = None
        if with_bit:  # the mean of the nodes' bits, each scaled to half the range: how many were clipped
            share = float(np.asarray(plan.average.pop()).ravel()[0]) / (float(self.cfg.federation.secagg.clipping_range) / 2)
            clipped_count = int(min(max(round(share * len(plan.contributors)), 0), len(plan.contributors)))
        if self.cfg.federation.secagg.distributed_noise:
            plan.average = self._decoded(plan, stage_grid, server_round)
        average = ArrayRecord({k: _array(g + u) for k, g, u in zip(names, globals_, plan.average)})  # type: ignore[arg-type]
        # One out-of-range update spoils the sum, and no one can say whose it was: stop, do not publish it.
        bound = self.cfg.federation.max_update_norm or default_max_update_norm(self.cfg, numel)
        reason = check_update(codec.record_to_state(sent), codec.record_to_state(average), bound)
        if reason is not None:
            self.recorder.stop(server_round, "train", f"the securely aggregated average was rejected ({reason}); an "
                               "institution sent an update outside the bound, and secure aggregation hides which")
        self.recorder.note(server_round, "secure_aggregation", {
            "contributors": sorted(plan.contributors), "dropped": sorted(stage_grid.failed),
            "threshold": state.threshold, "shares": state.num_shares,
            "bytes_up": {str(k): v for k, v in sorted(stage_grid.bytes_up.items())},
        })
        replies = []
        for node in plan.contributors:
            reply = stage_grid.collected[node]
            metrics = dict(reply.content[codec.METRICS]) if codec.METRICS in reply.content else {}
            metrics.pop(CLIPPED_COUNT, None)  # only the coordinator's own count, unmasked above, may stand here
            metrics["bytes-up"] = stage_grid.bytes_up[node]
            if clipped_count is not None:
                metrics[CLIPPED_COUNT] = clipped_count
            reply.content = RecordDict({codec.ARRAYS: average, codec.METRICS: MetricRecord(metrics)})
            replies.append(reply)
        return replies


    def _decoded(self, plan: _Round, stage_grid: _StageGrid, server_round: int) -> list[np.ndarray]:
        """Under distributed noise the unmasked mean is ΣK·(2R/T) / count: back to ΣK, then the federation's
        full-batch step -lr·ΣK / (γ·N), N the contributors' training records (fedslm.privacy.distributed)."""
        from fedslm.privacy.distributed import decoded_update, from_wire
        from fedslm.wire.secagg import distributed_lattice

        lattice = distributed_lattice(self.cfg)
        records = 0
        for node in plan.contributors:
            reply = stage_grid.collected[node]
            metrics = reply.content[codec.METRICS] if codec.METRICS in reply.content else {}
            value = metrics.get("num-examples")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 1 <= value < 2**40:
                self.recorder.stop(server_round, "train", f"distributed noise: node {node} reported no record count; "
                                   "the decoded sum cannot be scaled")
            # A claim, bounded like the weight the node's mask carries (federation.secagg.max_weight).
            records += int(min(value, max_weight(self.cfg)))  # type: ignore[arg-type, type-var]
        count = len(plan.contributors)
        return [decoded_update(from_wire(a, count, lattice), lattice, max_grad_norm=self.cfg.privacy.max_grad_norm,
                               lr=self.cfg.train.lr, num_examples=records) for a in plan.average]  # type: ignore[union-attr]


def _array(values: np.ndarray) -> Any:
    from flwr.app import Array

    return Array(np.asarray(values, dtype=np.float32))


def secure_aggregation_summary(cfg: Config, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    sa = cfg.federation.secagg
    per_round = {str(r["round"]): r["secure_aggregation"] for r in rounds if "secure_aggregation" in r}
    return {
        "protocol": "SecAgg+ (Flower's SecAggPlusWorkflow / secaggplus_mod), masks expanded with SHAKE-256",
        "what_the_coordinator_sees": "the weighted sum of the updates, never one institution's update; each "
                                     "institution's metrics (loss, epsilon, record count) in plain text",
        "threshold": sa.threshold, "shares": sa.shares, "clipping_range": sa.clipping_range,
        "quantization_range": quantization_range(cfg), "max_weight": max_weight(cfg),
        "quantization_step": quantization_step(cfg),
        "rounds": per_round,
    }
