"""Secure aggregation (Flower's SecAgg+) and client-side / adaptive client-level DP.

The secure rounds here run the real protocol end to end in one process: the coordinator's
SecureAggregationGrid drives Flower's workflow, and every message goes to the real ClientApp (with
Flower's secaggplus_mod) of the node it is addressed to, each node with its own persistent
context, data partition and ledger. What the nodes released is read back from their ledgers'
release files, which is the obviously correct reference for the average.
"""

from __future__ import annotations

import copy
import math
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as flower_prg
from flwr.supercore.task_identity import TaskIdentity

import fedslm.node.app as client_app
from fedslm.config import to_yaml
from fedslm.errors import ConfigError
from fedslm.coordinator import secagg
from fedslm.wire import secagg as wire_secagg
from fedslm.wire import codec
from fedslm.wire.errors import public_reason
from fedslm.coordinator.metrics import screened
from fedslm.coordinator.server import FederationStopped, RunRecorder, make_strategies
from fedslm.lora import get_adapter_state
from fedslm.privacy import Ledger
from fedslm.node.clipping import client_clip
from fedslm.node.releases import Releases, adapter_digest
from fedslm.train import build_node

NODES = [11, 12, 13, 14]


class NodesInProcess:
    """A grid whose nodes are the real ClientApp, called in this process.

    ``drop``: {stage: node or set of nodes} — that node's reply to that stage never arrives (a crash),
    or, with ``corrupt=True``, arrives with a masked vector of the wrong shape. ``replies``: every
    (stage, node, reply) the coordinator received, as an attacker would keep them.
    """

    def __init__(self, tmp_path: Path, nodes=NODES, drop=None, corrupt=False, tamper=None, tamper_records=None,
                 tamper_message=None, discard=None):
        self.nodes = list(nodes)
        self.drop = drop or {}
        self.discard = discard or {}  # {stage: nodes}: the node answers, the coordinator acts as if it had not
        self.corrupt = corrupt
        self.tamper = tamper or {}  # {(stage, node): fn(configs)}: the coordinator edits what it sends
        self.tamper_records = tamper_records or {}  # {(stage, node): fn(config_records)}: ... or any record
        self.tamper_message = tamper_message or {}  # {(stage, node): fn(message)}: ... or its metadata
        self.contexts = {n: Context(run_id=1, node_id=n, state=RecordDict(), run_config={}, node_config={
            "partition-id": i, "num-partitions": len(self.nodes)}) for i, n in enumerate(self.nodes)}
        self.stages: list[str] = []
        self.replies: list[tuple[str, int, Message]] = []
        self.sent: list[tuple[str, int, ConfigRecord]] = []  # (stage, node, stage record as delivered)
        self.withheld: dict[int, set[int]] = {}

    def _dropped(self, stage, node):
        dropped = self.drop.get(stage)
        return node in dropped if isinstance(dropped, (set, frozenset, list, tuple)) else dropped == node

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            node = msg.metadata.dst_node_id
            stage = (str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
                     if RECORD_KEY_CONFIGS in msg.content.config_records else "plain")
            self.stages.append(stage)
            TaskIdentity.node_id = node
            try:
                if self._dropped(stage, node) and not self.corrupt:
                    continue  # the node died before answering
                sent = copy.deepcopy(msg)  # as if it had crossed the wire
                if (stage, node) in self.tamper:
                    self.tamper[(stage, node)](sent.content.config_records[RECORD_KEY_CONFIGS])
                if (stage, node) in self.tamper_records:
                    self.tamper_records[(stage, node)](sent.content.config_records)
                if (stage, node) in self.tamper_message:
                    self.tamper_message[(stage, node)](sent)
                if RECORD_KEY_CONFIGS in sent.content.config_records:
                    self.sent.append((stage, node, sent.content.config_records[RECORD_KEY_CONFIGS]))
                reply = client_app.app(sent, self.contexts[node])
                if self._dropped(stage, node) and self.corrupt:
                    blobs = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
                    reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] = blobs[:-1]
                self.replies.append((stage, node, reply))
                if node in self.discard.get(stage, ()):
                    continue
                replies.append(reply)
            finally:
                TaskIdentity.node_id = 1
        return replies


def _train_messages(cfg, grid, strategy):
    node = build_node(cfg)
    initial = get_adapter_state(node.model)
    from fedslm.lora.adapter import frozen_digest

    config = ConfigRecord(dict(codec.request_config(to_yaml(cfg), node.base.fingerprint, "run-s",
                                                    frozen_digest(node.model))))
    return initial, list(strategy.configure_train(1, codec.state_to_record(initial), config, grid))


def _ledger(tmp_path, node) -> Ledger:
    """A simulated node's ledger (the scenario's output.dir is tmp_path/run)."""
    return Ledger(tmp_path / "run" / "ledgers" / f"institution-{NODES.index(node)}.json")


def _released(tmp_path, node, initial):
    """What ``node`` released in round 1 of run-s: read from its ledger's release file."""
    ledger = _ledger(tmp_path, node)
    entries = [e for record in ledger.read()["units"].values() for e in record["entries"]]
    found = Releases(ledger.path).find(entries, "run-s", 1, adapter_digest(initial))
    assert found is not None, f"node {node} released nothing"
    return found[:2]


def _secure_round(cfg, tmp_path, **grid_kwargs):
    grid = NodesInProcess(tmp_path, **grid_kwargs)
    recorder = RunRecorder(cfg, tmp_path, "run-s")
    outer, inner = make_strategies(cfg, recorder)
    initial, messages = _train_messages(cfg, grid, outer)
    replies = secagg.SecureAggregationGrid(grid, cfg, recorder).send_and_receive(messages)
    arrays, _ = outer.aggregate_train(1, replies)
    return grid, recorder, initial, codec.record_to_state(arrays), replies


@pytest.fixture
def secure_config(cls_config, tmp_path):
    def make(*overrides):
        return cls_config("federation.num_clients=4", "federation.min_clients=3", "federation.partitioner=iid",
                          "federation.secure_aggregation=true", f"output.dir={tmp_path / 'run'}", *overrides)
    return make


def test_mask_stream_uses_all_256_bits_of_the_seed_on_both_ends():
    import sys

    node_side = sys.modules["flwr.client.mod.secure_aggregation.secaggplus_mod"]
    coordinator_side = sys.modules["flwr.server.workflow.secure_aggregation.secaggplus_workflow"]
    assert node_side.pseudo_rand_gen is wire_secagg.mask_stream is coordinator_side.pseudo_rand_gen
    # Two seeds that differ only where Flower's 32-bit fold cancels out: same masks there, not here.
    a = bytes(range(32))
    b = bytes([a[0] ^ 0xFF]) + a[1:4] + bytes([a[4] ^ 0xFF]) + a[5:]
    shapes = [(1000,), (3, 7)]
    assert all(np.array_equal(x, y) for x, y in zip(flower_prg(a, 2**32, shapes), flower_prg(b, 2**32, shapes)))
    ours_a, ours_b = wire_secagg.mask_stream(a, 2**32, shapes), wire_secagg.mask_stream(a, 2**32, shapes)
    assert all(np.array_equal(x, y) for x, y in zip(ours_a, ours_b))  # deterministic in the seed
    other = wire_secagg.mask_stream(b, 2**32, shapes)
    assert not np.array_equal(ours_a[0], other[0])
    values = np.concatenate([m.ravel() for m in wire_secagg.mask_stream(b"\x01" * 32, 2**32, [(200_000,)])])
    assert values.min() >= 0 and values.max() < 2**32
    assert abs(values.mean() / 2**32 - 0.5) < 0.005  # uniform over the modulus
    with pytest.raises(ValueError, match="power of two"):
        wire_secagg.mask_stream(a, 3 * 2**20, shapes)


def _weighted_mean(states, weights):
    return {k: sum(w * s[k].double() for s, w in zip(states, weights)) / sum(weights) for k in states[0]}


def _quantisation_bound(cfg, weights):
    """The largest error SecAgg+'s stochastic quantisation can put on one coordinate of the average."""
    step = wire_secagg.quantization_step(cfg)
    ratios = [w / wire_secagg.max_weight(cfg) for w in weights]
    return len(weights) * step / sum(ratios) + 1e-6


def test_secure_round_equals_plain_fedavg_within_the_quantisation_error(flower_identity, secure_config, tmp_path):
    cfg = secure_config()
    grid, recorder, initial, average, replies = _secure_round(cfg, tmp_path)
    assert {"setup", "share_keys", "collect_masked_vectors", "unmask"} <= set(grid.stages)
    released = [_released(tmp_path, n, initial) for n in NODES]
    weights = [m["num-examples"] for _, m in released]
    reference = _weighted_mean([s for s, _ in released], weights)  # plain FedAvg, by examples
    bound = _quantisation_bound(cfg, weights)
    for key, ref in reference.items():
        err = float((average[key].double() - ref).abs().max())
        assert err <= bound, (key, err, bound)
    moved = max(float((reference[k] - initial[k].double()).abs().max()) for k in reference)
    assert moved > 100 * bound  # the check above is not vacuous: the adapter really moved
    note = recorder.pending[1]["secure_aggregation"]
    assert note["contributors"] == NODES and note["dropped"] == []
    # The coordinator holds each node's metrics, and the same average for all: never one node's update.
    assert {int(screened(r)["institution"]) for r in replies} == {0, 1, 2, 3}  # as the coordinator read them
    for node, (state, _) in zip(NODES, released):
        assert any(not torch.equal(state[k], average[k]) for k in state)


@pytest.mark.parametrize("stage,corrupt", [(Stage.COLLECT_MASKED_VECTORS, False), (Stage.UNMASK, False),
                                           (wire_secagg.CONSISTENCY_STAGE, False), (Stage.COLLECT_MASKED_VECTORS, True)],
                         ids=["dies-before-sending", "dies-after-sending", "dies-before-signing", "malformed-vector"])
def test_a_node_lost_within_the_threshold_does_not_stop_the_round(flower_identity, secure_config, tmp_path,
                                                                  stage, corrupt):
    cfg = secure_config()
    lost = NODES[1]
    grid, recorder, initial, average, replies = _secure_round(cfg, tmp_path, drop={stage: lost}, corrupt=corrupt)
    note = recorder.pending[1]["secure_aggregation"]
    in_sum = NODES if stage in (Stage.UNMASK, wire_secagg.CONSISTENCY_STAGE) else [n for n in NODES if n != lost]
    assert note["contributors"] == in_sum and note["dropped"] == [lost]
    errors = recorder.pending[1]["errors"]
    assert [e["node"] for e in errors] == [lost]
    assert ("does not match" in errors[0]["reason"]) if corrupt else ("dropped out" in errors[0]["reason"])
    released = [_released(tmp_path, n, initial) for n in in_sum]
    weights = [m["num-examples"] for _, m in released]
    reference = _weighted_mean([s for s, _ in released], weights)
    bound = _quantisation_bound(cfg, weights)
    for key, ref in reference.items():
        assert float((average[key].double() - ref).abs().max()) <= bound, key


def test_too_many_lost_nodes_stop_the_run_with_the_reason(flower_identity, secure_config, tmp_path):
    cfg = secure_config("federation.secagg.threshold=1.0")  # every share needed: no node may be lost
    with pytest.raises(FederationStopped, match="secure aggregation halted at stage collect-masked-vectors"):
        _secure_round(cfg, tmp_path, drop={Stage.COLLECT_MASKED_VECTORS: NODES[0]})
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert line["stopped"] and line["errors"][0]["node"] == NODES[0]


def test_an_out_of_range_update_stops_the_round_instead_of_spoiling_the_average(flower_identity, secure_config,
                                                                                 tmp_path, monkeypatch):
    import fedslm.node.serve as node_side

    honest = node_side.secure_payload

    def poisoned(sent, state, num_examples, **bounds):
        update, weight, metrics = honest(sent, state, num_examples, **bounds)
        if TaskIdentity.node_id == NODES[2]:
            update = [np.full_like(u, 0.9) for u in update]  # within the quantisation range, far past the norm bound
        return update, weight, metrics

    monkeypatch.setattr(node_side, "secure_payload", poisoned)
    cfg = secure_config("federation.max_update_norm=1")
    with pytest.raises(FederationStopped, match="securely aggregated average was rejected .*secure aggregation hides"):
        _secure_round(cfg, tmp_path)


def test_secure_aggregation_with_client_side_clipping_bounds_the_average(flower_identity, secure_config, tmp_path):
    cfg = secure_config("privacy.client_level.enabled=true", "privacy.client_level.clipping=client",
                        "privacy.client_level.clipping_norm=0.05", "privacy.client_level.noise_multiplier=1e-6",
                        "train.lr=0.05")
    grid, recorder, initial, average, replies = _secure_round(cfg, tmp_path)
    released = [_released(tmp_path, n, initial) for n in NODES]
    for state, metrics in released:  # each node clipped its own update before masking it
        norm = float(torch.sqrt(sum(((state[k].double() - initial[k].double()) ** 2).sum() for k in state)))
        assert norm <= 0.05 * (1 + 1e-4) and metrics["norm_bit"] == 1 and metrics["update-norm"] > 0.05
    reference = _weighted_mean([s for s, _ in released], [1] * len(NODES))  # unweighted under client-level DP
    bound = _quantisation_bound(cfg, [1] * len(NODES)) + 1e-5  # plus the (tiny) DP noise
    for key, ref in reference.items():
        assert float((average[key].double() - ref).abs().max()) <= bound, key
    assert recorder.pending[1]["client_level"]["clipping_norm"] == 0.05


def test_under_secure_aggregation_the_clipped_bits_travel_only_as_their_masked_sum(flower_identity, secure_config,
                                                                                   tmp_path, monkeypatch):
    """Adaptive client-side clipping needs how many nodes were clipped. Under SecAgg+ each node's bit rides in
    its masked vector as one more coordinate: the coordinator unmasks the count and never sees a node's bit
    (the plain metric is withheld). Nodes 11 and 12 report clipped, 13 and 14 not: the count is 2."""
    import fedslm.node.serve as node_side
    from flwr.supercore.differential_privacy import KEY_NORM_BIT

    honest = node_side.client_clip

    def forced(*args):
        clipped, extra = honest(*args)
        return clipped, {**extra, KEY_NORM_BIT: int(TaskIdentity.node_id in NODES[:2])}

    monkeypatch.setattr(node_side, "client_clip", forced)
    cfg = secure_config("privacy.client_level.enabled=true", "privacy.client_level.clipping=client",
                        "privacy.client_level.adaptive=true", "privacy.client_level.clipping_norm=0.05",
                        "privacy.client_level.noise_multiplier=0.5", "privacy.client_level.target_quantile=0.5")
    grid, recorder, initial, average, replies = _secure_round(cfg, tmp_path)
    assert all(screened(r)[KEY_NORM_BIT] == codec.WITHHELD for r in replies)  # what the coordinator read
    assert {screened(r)[wire_secagg.CLIPPED_COUNT] for r in replies} == {2}
    assert recorder.pending[1]["client_level"]["clipped"] == 2
    assert set(average) == set(initial)  # the extra coordinate is not part of the adapter


def test_secure_aggregation_refuses_server_side_clipping_and_two_institutions(secure_config):
    with pytest.raises(ConfigError, match="privacy.client_level.clipping=client"):
        secure_config("privacy.client_level.enabled=true")
    with pytest.raises(ConfigError, match="federation.min_clients >= 3"):
        secure_config("federation.min_clients=2")


def test_a_node_that_requires_secure_aggregation_refuses_a_plain_round(flower_identity, cls_config, tmp_path,
                                                                      class_csv, node_policy):
    cfg = cls_config("federation.num_clients=2", "federation.partitioner=iid", "privacy.noise_seed=null")
    grid = NodesInProcess(tmp_path, nodes=[11, 12])
    ledger = tmp_path / "ledger-12.json"
    grid.contexts[12].node_config = {"policy": str(node_policy(cfg, data=class_csv, ledger=ledger,
                                                               require_secure_aggregation=True))}
    recorder = RunRecorder(cfg, tmp_path, "run-s")
    outer, _ = make_strategies(cfg, recorder)
    _, messages = _train_messages(cfg, grid, outer)
    replies = grid.send_and_receive(messages)
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert not by_node[11].has_error()
    assert by_node[12].has_error() and by_node[12].error.reason == public_reason("refused-by-policy")
    assert not ledger.exists()  # refused before training: nothing charged


# -------------------------------------------------------------------------------- client-level DP


def _reply(node, arrays, metrics=None):
    TaskIdentity.node_id = 1
    req = Message(RecordDict({codec.CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=node,
                  message_type=MessageType.TRAIN)
    TaskIdentity.node_id = node
    reply = Message(RecordDict({
        codec.ARRAYS: ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
        codec.METRICS: MetricRecord({"num-examples": 10, "unit-weight": 1, "institution": node, "train-loss": 1.0,
                                     "epsilon": 1.0, "delta": 1e-5, **(metrics or {})}),
    }), reply_to=req)
    TaskIdentity.node_id = 1
    return reply


def test_node_side_clipping_bounds_the_update_and_checks_the_coordinator_agrees():
    sent = {"a": np.zeros(4, np.float32), "b": np.ones(3, np.float32)}
    values = {"a": np.full(4, 3.0, np.float32), "b": np.ones(3, np.float32)}  # update norm 6
    clipped, extra = client_clip(True, 0.5, sent, values)
    update = np.concatenate([clipped["a"] - sent["a"], clipped["b"] - sent["b"]])
    assert np.linalg.norm(update) == pytest.approx(0.5, rel=1e-6) and extra["norm_bit"] == 1
    assert extra["update-norm"] == pytest.approx(6.0)
    small = {"a": np.full(4, 0.01, np.float32), "b": np.ones(3, np.float32)}
    kept, extra = client_clip(True, 0.5, sent, small)
    assert np.array_equal(kept["a"], small["a"]) and extra["norm_bit"] == 0
    from fedslm.node.clipping import ClippingMismatch

    with pytest.raises(ClippingMismatch, match="sent no clipping bound"):
        client_clip(True, None, sent, values)
    with pytest.raises(ClippingMismatch, match="does not ask"):
        client_clip(False, 0.5, sent, values)


def test_client_side_clipping_rejects_a_node_that_did_not_clip(flower_identity, cls_config, tmp_path):
    cfg = cls_config("federation.num_clients=3", "federation.min_clients=2", "privacy.client_level.enabled=true",
                     "privacy.client_level.clipping=client", "privacy.client_level.clipping_norm=0.5",
                     "privacy.client_level.noise_multiplier=1e-9", "federation.max_update_norm=100")
    sent = {"w": np.zeros(8, np.float32)}
    outer, inner = make_strategies(cfg, RunRecorder(cfg, tmp_path, "r"))
    config = ConfigRecord({"server-round": 1})
    grid = NodesInProcess(tmp_path, nodes=[2, 3, 4])
    messages = list(outer.configure_train(1, codec.state_to_record({"w": torch.zeros(8)}), config, grid))
    assert all(m.content[codec.CONFIG]["clipping_norm"] == 0.5 for m in messages)  # the bound goes to the nodes
    inner.recorder.sent = []  # these were never sent (no message ids): name nodes by the replies' sender
    honest = [{"w": np.full(8, 0.1, np.float32)}, {"w": np.full(8, -0.1, np.float32)}]  # norms 0.28
    cheat = {"w": np.full(8, 1.0, np.float32)}  # norm 2.8: ignored the bound
    arrays, _ = outer.aggregate_train(1, [_reply(2, honest[0]), _reply(3, cheat), _reply(4, honest[1])])
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.zeros(8), atol=1e-6)
    reasons = {e["node"]: e["reason"] for e in inner.recorder.pending[1]["errors"]}
    assert list(reasons) == [3] and "norm" in reasons[3]
    assert sent  # the coordinator never clipped: the honest updates went in as sent


@pytest.mark.parametrize("side", ["server", "client"])
def test_adaptive_clipping_noises_with_the_rounds_bound_and_moves_it_to_the_quantile(flower_identity, cls_config,
                                                                                    tmp_path, side):
    cfg = cls_config("federation.num_clients=4", "federation.min_clients=4", "privacy.client_level.enabled=true",
                     f"privacy.client_level.clipping={side}", "privacy.client_level.adaptive=true",
                     "privacy.client_level.clipping_norm=1.0", "privacy.client_level.noise_multiplier=0.5",
                     "privacy.client_level.target_quantile=0.0", "privacy.client_level.clip_norm_lr=2.0",
                     "privacy.client_level.clipped_count_stddev=0.3", "federation.max_update_norm=1e9")
    n = 40_000
    outer, inner = make_strategies(cfg, RunRecorder(cfg, tmp_path, "r"))
    zero = {"w": np.zeros(n, np.float32)}
    list(outer.configure_train(1, codec.state_to_record({"w": torch.zeros(n)}), ConfigRecord({"server-round": 1}),
                               NodesInProcess(tmp_path, nodes=[2, 3, 4, 5])))
    inner.recorder.sent = []
    # Every update is far over the bound, so every one is clipped (client side: the nodes say so).
    big = {"w": np.full(n, 5.0 if side == "server" else 1.0 / np.sqrt(n), np.float32)}
    bit = {"norm_bit": 1} if side == "client" else {}
    replies = [_reply(k, big if k != 5 else zero, bit if k != 5 or not bit else {"norm_bit": 0}) for k in (2, 3, 4, 5)]
    arrays, _ = outer.aggregate_train(1, replies)
    note = inner.recorder.pending[1]["client_level"]
    assert note["clipping_norm"] == 1.0 and note["clipped"] == 3
    # z_Δ = (z⁻² − (2σ_b)⁻²)^-½ with z = 0.5, σ_b = 0.3; noise std = z_Δ · C_round / m, C_round = 1.0
    z_delta = (0.5 ** -2 - 0.6 ** -2) ** -0.5
    mean = arrays.to_numpy_ndarrays()[0] - (3 / 4) * (1.0 / np.sqrt(n))  # clipped updates have norm 1
    assert float(mean.std()) == pytest.approx(z_delta * 1.0 / 4, rel=0.03)
    # Target quantile 0: the bound falls by exp(-lr · noised clipped fraction), after the noise.
    assert note["next_clipping_norm"] == pytest.approx(np.exp(-2.0 * note["clipped_fraction_noised"]))
    assert abs(note["clipped_fraction_noised"] - 0.75) < 6 * 0.3 / 4 and note["next_clipping_norm"] < 0.6
    assert outer.clipping_norm == note["next_clipping_norm"]


# -------------------------------------------------------------------------------- the node enforces SecAgg+


def _identity(tmp_path: Path, node: int) -> Path:
    """Node ``node``'s institution identity key (made once per test, as ``fedslm node keygen`` makes it)."""
    from fedslm.wire import identity

    key = tmp_path / "keys" / f"n{node}.key"
    if not key.exists():
        identity.generate(key)
    return key


@pytest.fixture
def deployed_grid(tmp_path, class_csv, node_policy):
    """Four deployed nodes (each with its policy and ledger) answering through the real ClientApp. Each
    institution has an identity key and lists the others' (``peers``: {node: [nodes it lists]}; by
    default every node in the grid lists every other)."""
    import yaml

    def make(cfg, *, min_cohort=3, peers=None, max_unverified_share=0.0, privacy=None, size_is_public=False,
             max_colluding=0, **kwargs):
        grid = NodesInProcess(tmp_path, **kwargs)
        for i, n in enumerate(grid.nodes):
            path = node_policy(cfg, data=class_csv, name=f"n{n}", ledger=tmp_path / f"ledger-{n}.json", max_epsilon=50,
                               path=tmp_path / f"policy-{n}.yaml", size_is_public=size_is_public, **(privacy or {}))
            listed = (peers or {}).get(n, [m for m in grid.nodes if m != n])
            section = {"min_cohort": min_cohort, "min_threshold": 2, "identity_key": f"keys/n{n}.key",
                       "max_unverified_share": max_unverified_share, "max_colluding": max_colluding,
                       "peers": {f"n{m}": f"keys/n{m}.key.pub" for m in listed}}
            for m in [n, *listed]:
                _identity(tmp_path, m)
            path.write_text(path.read_text() + yaml.safe_dump({"secure_aggregation": section}))
            grid.contexts[n].node_config = {"policy": str(path), "institution": i}
        return grid

    return make


def _deployed_round(cfg, tmp_path, grid):
    recorder = RunRecorder(cfg, tmp_path, "run-s")
    outer, _ = make_strategies(cfg, recorder)
    initial, messages = _train_messages(cfg, grid, outer)
    replies = secagg.SecureAggregationGrid(grid, cfg, recorder).send_and_receive(messages)
    return recorder, initial, messages, replies


@pytest.mark.parametrize("overrides,min_cohort", [(("federation.secagg.threshold=0.5",), 3), ((), 5)],
                         ids=["threshold-half", "cohort-below-policy"])
def test_a_node_refuses_a_threshold_or_cohort_its_policy_does_not_accept(flower_identity, secure_config, tmp_path,
                                                                         deployed_grid, overrides, min_cohort):
    """Threshold 2 of 4 shares: told in two halves that a node dropped and that it is alive, a coordinator
    would rebuild both of its secrets. Every node refuses at setup, before it trained or paid."""
    cfg = secure_config("privacy.noise_seed=null", *overrides)
    with pytest.raises(FederationStopped, match="halted at stage setup"):
        _deployed_round(cfg, tmp_path, deployed_grid(cfg, min_cohort=min_cohort))
    assert not any((tmp_path / f"ledger-{n}.json").exists() for n in NODES)


def test_a_node_refuses_neighbours_no_listed_institution_signed(flower_identity, secure_config, tmp_path,
                                                               deployed_grid):
    """Node 11 lists only institution 12. Nodes 13 and 14 are, to it, what a coordinator would make up to
    unmask it: they sign their keys, but with identities 11 never agreed to. Node 11 refuses at share keys,
    before it encrypts a share to them or trains; 12-14, which list each other, go on (threshold 3 of 4:
    the round completes with three). With today's code before identities, node 11 trained and masked."""
    cfg = secure_config("privacy.noise_seed=null")
    grid = deployed_grid(cfg, peers={NODES[0]: [NODES[1]]})
    recorder, _, _, _ = _deployed_round(cfg, tmp_path, grid)
    errors = {e["node"]: (e["phase"], e["reason"]) for e in recorder.pending[1]["errors"]}
    assert errors[NODES[0]] == ("train/secagg-share_keys", public_reason("secure-aggregation"))
    assert not (tmp_path / f"ledger-{NODES[0]}.json").exists()  # it never trained, so never paid
    assert recorder.pending[1]["secure_aggregation"]["contributors"] == NODES[1:]


@pytest.mark.parametrize("attack", ["moved", "stripped", "foreign"])
def test_a_node_refuses_a_signature_moved_stripped_or_not_its_peers(flower_identity, secure_config, tmp_path,
                                                                    deployed_grid, attack):
    """The coordinator edits what it relays to node 11: 12's signed identity shown for 13 (a signature bound
    to one node id moved to another), 13's identity left out, or 13's replaced by a key of the coordinator's
    own that signs 13's round keys correctly. Each leaves an unverified neighbour, which 11 refuses."""
    from fedslm.wire import identity

    def edit(records):
        peers = records[identity.PEERS]
        if attack == "moved":
            peers[str(NODES[2])] = peers[str(NODES[1])]
        elif attack == "stripped":
            del peers[str(NODES[2])]
        else:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            pk1, pk2 = (bytes(v) for v in records[RECORD_KEY_CONFIGS][str(NODES[2])])
            forged = identity.sign(Ed25519PrivateKey.generate(), identity.signed_bytes(1, "1", NODES[2], pk1, pk2))
            peers[str(NODES[2])] = list(forged)

    cfg = secure_config("privacy.noise_seed=null")
    grid = deployed_grid(cfg, tamper_records={(Stage.SHARE_KEYS, NODES[0]): edit})
    recorder, _, _, _ = _deployed_round(cfg, tmp_path, grid)
    errors = {e["node"]: e["phase"] for e in recorder.pending[1]["errors"]}
    assert errors == {NODES[0]: "train/secagg-share_keys"}
    assert recorder.pending[1]["secure_aggregation"]["contributors"] == NODES[1:]


@pytest.mark.parametrize("listed,share,refused", [((1, 2), 0.4, False), ((1,), 0.7, True)],
                         ids=["one-unverified-allowed", "threshold-minus-one-refused"])
def test_max_unverified_share_lets_a_node_accept_some_unlisted_neighbours(flower_identity, secure_config, tmp_path,
                                                                          deployed_grid, listed, share, refused):
    """Node 11 lists 12 and 13 and accepts up to 40% unverified neighbours (14: 1 of its 3, and fewer than
    threshold 3 - 1): the whole cohort masks. Listing only 12 (2 of 3 unverified) is refused even at a share
    of 0.7: with threshold - 1 = 2 made-up neighbours plus its own share a coordinator holds a threshold."""
    cfg = secure_config("privacy.noise_seed=null")
    grid = deployed_grid(cfg, peers={NODES[0]: [NODES[i] for i in listed]}, max_unverified_share=share)
    recorder, _, _, _ = _deployed_round(cfg, tmp_path, grid)
    errors = {e["node"]: e["phase"] for e in recorder.pending[1]["errors"]}
    assert errors == ({NODES[0]: "train/secagg-share_keys"} if refused else {})
    assert recorder.pending[1]["secure_aggregation"]["contributors"] == (NODES[1:] if refused else NODES)


@pytest.mark.parametrize("attack", ["other-group", "other-node", "huge-values"])
def test_a_node_refuses_stages_of_another_setup_or_node_and_never_expands_relayed_values(
        flower_identity, secure_config, tmp_path, deployed_grid, caplog, attack):
    """Node 11's share-keys message is moved to another protocol run (another group: its neighbours' signed
    keys could come from a setup it never answered), or addressed to another node id, or relays a neighbour's
    identity as integers (bytes(10**10) would allocate 10 GB): each refused at share keys, the node alive."""
    import logging

    from fedslm.wire import identity

    def other_group(msg):
        msg.metadata.__dict__["_group_id"] = "99"

    def other_node(msg):
        msg.metadata.__dict__["_dst_node_id"] = NODES[3]

    def huge(records):
        records[identity.PEERS][str(NODES[1])] = [10**10, 0]

    hooks = {"other-group": {"tamper_message": {(Stage.SHARE_KEYS, NODES[0]): other_group}},
             "other-node": {"tamper_message": {(Stage.SHARE_KEYS, NODES[0]): other_node}},
             "huge-values": {"tamper_records": {(Stage.SHARE_KEYS, NODES[0]): huge}}}[attack]
    cfg = secure_config("privacy.noise_seed=null")
    grid = deployed_grid(cfg, **hooks)
    recorder = RunRecorder(cfg, tmp_path, "run-s")
    outer, _ = make_strategies(cfg, recorder)
    _, messages = _train_messages(cfg, grid, outer)
    with caplog.at_level(logging.WARNING, logger="fedslm.node.secagg"):
        try:
            secagg.SecureAggregationGrid(grid, cfg, recorder).send_and_receive(messages)
            errors = recorder.pending[1]["errors"]
        except FederationStopped:  # another node id: the refusal names that node, and 11 never answered
            errors = recorder.rounds[-1]["errors"]
    assert errors and all(e["phase"] == "train/secagg-share_keys" for e in errors)
    assert NODES[0] in {e["node"] for e in errors} or attack == "other-node"
    expected = {"other-group": "but this node set up", "other-node": "not this node",
                "huge-values": "carry no signature"}[attack]
    assert expected in caplog.text


@pytest.mark.parametrize("restart", [False, True], ids=["same-process", "after-a-supernode-restart"])
def test_a_setup_is_never_repeated_for_the_same_run_and_round(flower_identity, secure_config, tmp_path,
                                                              deployed_grid, restart):
    """The same setup again: the nodes' signed round keys and survivor lists for that run and round could
    be replayed into another session (a second story about who dropped out); every node refuses at
    setup and nothing is charged again. ``after-a-supernode-restart``: the nodes' contexts (the
    SuperNode's memory, Flower's and fedslm's protocol state in it) are gone; the refusal comes from
    the session record beside each ledger."""
    from fedslm.node.policy import load_policy
    from fedslm.node.sessions import SessionRecord, owner

    cfg = secure_config("privacy.noise_seed=null")
    grid = deployed_grid(cfg)
    _, _, messages, _ = _deployed_round(cfg, tmp_path, grid)
    run_id = messages[0].metadata.run_id
    for n in NODES:
        policy = load_policy(grid.contexts[n].node_config["policy"])
        record = SessionRecord(tmp_path / f"ledger-{n}.json", owner(policy))
        assert record.last_round(run_id) == 1
        assert record.signed(run_id) == NODES
        assert record.path.stat().st_mode & 0o777 == 0o600
    if restart:
        for n, ctx in grid.contexts.items():
            grid.contexts[n] = Context(run_id=ctx.run_id, node_id=n, state=RecordDict(), run_config={},
                                       node_config=dict(ctx.node_config))
    (tmp_path / "again").mkdir()
    recorder = RunRecorder(cfg, tmp_path / "again", "run-s")
    with pytest.raises(FederationStopped, match="halted at stage setup"):
        secagg.SecureAggregationGrid(grid, cfg, recorder).send_and_receive(copy.deepcopy(messages))
    assert all([e["round"] for e in Ledger(tmp_path / f"ledger-{n}.json").entries("all-records")] == [1]
               for n in NODES)


def test_the_session_record_refuses_a_second_list_another_round_and_an_unreadable_file(tmp_path, monkeypatch):
    """The record on disk by itself: forward-only setups per run, one signed list per round set up last,
    per signer (two SuperNodes sharing a ledger keep their own rounds), bounded in size, and a damaged
    file stops secure aggregation instead of reading as "nothing set up yet"."""
    import fedslm.node.sessions as sessions
    from fedslm.node.sessions import SessionRecord, SessionRecordError

    other = SessionRecord(tmp_path / "ledger.json", "unit:other-dataset")
    other.set_up(7, 5)
    record = SessionRecord(tmp_path / "ledger.json", "unit:all-records")
    assert record.last_round(7) == -1
    record.set_up(7, 2)
    record.set_up(8, 1)  # another run has its own rounds
    with pytest.raises(SessionRecordError, match="rounds only move forward"):
        record.set_up(7, 2)
    with pytest.raises(SessionRecordError, match="rounds only move forward"):
        record.set_up(7, 1)
    with pytest.raises(SessionRecordError, match="not the round this node set up last"):
        record.sign(7, 1, [1, 2, 3])
    record.sign(7, 2, [1, 2, 3])
    record.sign(7, 2, [1, 2, 3])  # the same list again (a retried reply) is the same signature
    with pytest.raises(SessionRecordError, match="second survivor list"):
        SessionRecord(tmp_path / "ledger.json", "unit:all-records").sign(7, 2, [1, 2, 4])
    record.set_up(7, 3)
    assert record.last_round(7) == 3 and record.signed(7) is None and other.last_round(7) == 5
    with pytest.raises(SessionRecordError, match="outside"):
        record.set_up(9, 2**32)
    monkeypatch.setattr(sessions, "MAX_RUNS", 4)  # three owner/run entries so far
    record.set_up(9, 1)
    record.set_up(9, 2)  # a run it holds goes on
    with pytest.raises(SessionRecordError, match="holds 4 protocol runs"):
        record.set_up(10, 1)
    record.path.write_text("{")
    with pytest.raises(SessionRecordError, match="unreadable"):
        record.set_up(7, 4)


@pytest.mark.parametrize("story", ["both", "dropped-survivor"])
def test_a_node_listed_both_alive_and_dropped_is_never_unmasked(flower_identity, secure_config, tmp_path,
                                                                deployed_grid, story):
    """The coordinator lists node 12 as dropped (and alive) in node 11's unmask request: revealing both
    its sk1 share and its mask-seed share would help rebuild both of 12's secrets. Node 11 refuses. So it
    does when 12 is listed only as dropped, but is in the survivor list 11 signed (the others, told 12 is
    alive, send 12's mask-seed shares)."""
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    def both(configs):
        configs[Key.DEAD_NODE_ID_LIST] = [NODES[1]]
        if story == "dropped-survivor":  # only dropped, as the survivor list 11 signed does not say
            configs[Key.ACTIVE_NODE_ID_LIST] = [n for n in configs[Key.ACTIVE_NODE_ID_LIST] if n != NODES[1]]

    cfg = secure_config("privacy.noise_seed=null")
    grid = deployed_grid(cfg, tamper={(Stage.UNMASK, NODES[0]): both})
    recorder, _, _, _ = _deployed_round(cfg, tmp_path, grid)
    errors = [e for e in recorder.pending[1]["errors"] if e["node"] == NODES[0]]
    assert errors and errors[0]["reason"] == public_reason("secure-aggregation")


FIVE = [11, 12, 13, 14, 15]


def _strip_masks(grid, cfg, victim):
    """The coordinator's attempt to read ``victim``'s update from what it received: its masked vector,
    minus its self-mask (rebuilt from the mask-seed shares the others sent) and minus its pairwise
    mask with every node it masked with (rebuilt from that node's sk1 shares, as if it had dropped).
    None when the shares it holds do not rebuild every one of those secrets."""
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key
    from flwr.common.secure_aggregation.quantization import dequantize

    def replies(stage):
        return {n: r for st, n, r in grid.replies if st == stage and not r.has_error()}

    if victim not in replies(Stage.COLLECT_MASKED_VECTORS):
        return None
    shares: dict[tuple[str, int], list[bytes]] = {}  # (which secret, owner) -> shares
    for node, reply in replies(Stage.UNMASK).items():
        sent = [m for st, n, m in grid.sent if st == Stage.UNMASK and n == node][-1]
        alive = set(int(n) for n in sent[Key.ACTIVE_NODE_ID_LIST])
        got = reply.content.config_records[RECORD_KEY_CONFIGS]
        for owner, share in zip(got[Key.NODE_ID_LIST], got[Key.SHARE_LIST]):
            shares.setdefault(("seed" if owner in alive else "sk1", int(owner)), []).append(bytes(share))
    threshold = round(cfg.federation.secagg.threshold * len(grid.nodes))
    masked_with = [n for n in grid.nodes if n != victim and n not in grid.withheld.get(victim, ())]
    needed = [("seed", victim)] + [("sk1", n) for n in masked_with]
    if any(len(shares.get(k, [])) < threshold for k in needed):
        return None
    vector = [bytes_to_ndarray(b).astype(np.int64) for b in
              replies(Stage.COLLECT_MASKED_VECTORS)[victim].content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
    dims = [v.shape for v in vector]
    modulus = wire_secagg.MODULUS
    own = wire_secagg.mask_stream(combine_shares(shares[("seed", victim)]), modulus, dims)
    vector = [v - m for v, m in zip(vector, own)]
    pk1 = replies(Stage.SETUP)[victim].content.config_records[RECORD_KEY_CONFIGS][Key.PUBLIC_KEY_1]
    for n in masked_with:
        key = generate_shared_key(bytes_to_private_key(combine_shares(shares[("sk1", n)])), bytes_to_public_key(pk1))
        pair = wire_secagg.mask_stream(key, modulus, dims)
        vector = [v - m if victim > n else v + m for v, m in zip(vector, pair)]
    vector = [np.mod(v, modulus) for v in vector]
    levels = wire_secagg.quantization_range(cfg)
    ratio = float(vector[0].ravel()[0]) / levels  # the weight factor Flower puts first
    return [a / ratio for a in dequantize(vector[1:], cfg.federation.secagg.clipping_range, levels)], ratio


@pytest.mark.parametrize("checks", ["on", "off"])
def test_a_coordinator_cannot_isolate_an_update_by_telling_nodes_different_dropouts(
        flower_identity, secure_config, tmp_path, deployed_grid, monkeypatch, checks):
    """Five institutions, threshold 3 of 5. The coordinator forwards node 11 only the shares of 12 and 13,
    so 11 masks with those two alone; it then throws away the masked vectors of 12 and 13 and tells each
    story to whom it needs: to 14 and 15 that 12 and 13 dropped, to 12 that 13 dropped and to 13 that 12
    did, and to all four that 11 is alive. No request names a node both alive and dropped, yet their
    answers hold 11's mask seed and the sk1 keys of 12 and 13, which rebuild 11's self-mask and both of
    its pairwise masks: 11's update lies bare.

    With the consistency stage each node signs one survivor list per round and answers the unmask stage
    only for it, when more than half of the institutions it lists signed that list: the coordinator
    needs three signatures on each of its stories and gets one or two; 11 refuses a list naming
    neighbours it never masked with. No share comes back. With the node's checks off (``checks=off``,
    the code before this stage), the same attack reads 11's update back to the quantisation step."""
    import fedslm.node.secagg.checks as node_checks  # check_stage calls them there
    from fedslm.wire import identity

    if checks == "off":
        monkeypatch.setattr(node_checks, "check_survivors", lambda *args: None)
        monkeypatch.setattr(node_checks, "check_unmask", lambda *args: None)
    victim, a, b, c, d = FIVE

    def withhold(configs):  # 11 gets the ciphertexts of 12 and 13 only
        keep = [i for i, src in enumerate(configs[Key.SOURCE_LIST]) if src in (a, b)]
        configs[Key.CIPHERTEXT_LIST] = [configs[Key.CIPHERTEXT_LIST][i] for i in keep]
        configs[Key.SOURCE_LIST] = [configs[Key.SOURCE_LIST][i] for i in keep]

    cfg = secure_config("privacy.noise_seed=null", "federation.num_clients=5", "federation.secagg.threshold=0.6")
    grid = deployed_grid(cfg, nodes=FIVE, tamper={(Stage.COLLECT_MASKED_VECTORS, victim): withhold},
                         discard={Stage.COLLECT_MASKED_VECTORS: {a, b}}, drop={Stage.UNMASK: victim})
    grid.withheld = {victim: {c, d}}
    recorder = RunRecorder(cfg, tmp_path, "run-s")
    outer, _ = make_strategies(cfg, recorder)
    initial, messages = _train_messages(cfg, grid, outer)
    with pytest.raises(FederationStopped):  # 14 and 15 told 12 and 13 dropped; 11 not asked
        secagg.SecureAggregationGrid(grid, cfg, recorder).send_and_receive(messages)

    def stage(node, configs, records=None):
        content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs), **(records or {})})
        return Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN, group_id="1")

    stories = {a: ([victim, a, c, d], [b]), b: ([victim, b, c, d], [a])}  # node: (alive, dropped)
    grid.send_and_receive([stage(n, {Key.STAGE: wire_secagg.CONSISTENCY_STAGE, identity.SURVIVORS: alive})
                           for n, (alive, _) in stories.items()])
    signed = {str(n): [r.content.config_records[identity.CONSISTENCY][k] for k in (identity.KEY, identity.SIGNATURE)]
              for st, n, r in grid.replies if st == wire_secagg.CONSISTENCY_STAGE and not r.has_error()
              and identity.KEY in r.content.config_records[identity.CONSISTENCY]}
    grid.send_and_receive([stage(n, {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: alive,
                                     Key.DEAD_NODE_ID_LIST: dead}, {identity.CONSISTENCY: ConfigRecord(signed)})
                           for n, (alive, dead) in stories.items()])
    stripped = _strip_masks(grid, cfg, victim)
    if checks == "on":
        assert stripped is None
        answered = {n for st, n, r in grid.replies if st == Stage.UNMASK and not r.has_error()}
        assert answered == set()
        errors = {(e["node"], e["phase"]) for e in recorder.rounds[-1]["errors"]}
        assert (victim, f"train/secagg-{wire_secagg.CONSISTENCY_STAGE}") in errors
        # A node signs one list per round: 14 signed {11, 14, 15} and refuses 12's story.
        (again,) = grid.send_and_receive([stage(c, {Key.STAGE: wire_secagg.CONSISTENCY_STAGE,
                                                    identity.SURVIVORS: stories[a][0]})])
        assert again.has_error()
        return
    assert stripped is not None, "the attack no longer works with the checks off: the test proves nothing"
    update, ratio = stripped
    assert len(update) == len(initial)
    ledger = Ledger(tmp_path / f"ledger-{victim}.json")
    entries = [e for record in ledger.read()["units"].values() for e in record["entries"]]
    released, _ = Releases(ledger.path).find(entries, "run-s", 1, adapter_digest(initial))[:2]
    step = wire_secagg.quantization_step(cfg) / ratio
    for got, key in zip(update, initial):
        want = (released[key].double() - initial[key].double()).numpy()
        assert np.abs(got - want).max() <= 2 * step + 1e-9
    assert any(np.abs(got).max() > 10 * step for got in update)  # a real update read back, not zeros


@pytest.mark.parametrize("stage", [Stage.COLLECT_MASKED_VECTORS, wire_secagg.CONSISTENCY_STAGE],
                         ids=["dies-before-sending", "dies-before-signing"])
def test_deployed_nodes_unmask_after_one_dropout_with_a_majority_of_signatures(flower_identity, secure_config,
                                                                               tmp_path, deployed_grid, caplog, stage):
    """Four institutions, one lost before it masked: three survivors, three of the four sign (a majority),
    and the round completes with the sum over the survivors. Lost after it masked but before it signed:
    its vector is in the sum, but no node gives out the mask seed of a node that never vouched for the
    list (else a coordinator could unmask a node that would have refused it), so the round stops at
    unmask with the reason and nothing is published."""
    import logging

    cfg = secure_config("privacy.noise_seed=null")
    lost = NODES[1]
    grid = deployed_grid(cfg, drop={stage: lost})
    if stage == wire_secagg.CONSISTENCY_STAGE:
        with caplog.at_level(logging.WARNING, logger="fedslm.node.secagg"), \
                pytest.raises(FederationStopped, match="halted at stage unmask"):
            _deployed_round(cfg, tmp_path, grid)
        assert f"nodes [{lost}] are listed alive but did not sign the survivor list" in caplog.text
        return
    with caplog.at_level(logging.INFO, logger="fedslm.node.secagg"):
        recorder, _, _, _ = _deployed_round(cfg, tmp_path, grid)
    note = recorder.pending[1]["secure_aggregation"]
    assert note["contributors"] == [n for n in NODES if n != lost]
    assert "signed by 3 of 4 listed institutions" in caplog.text


def test_a_setup_flower_rejects_leaves_the_nodes_protocol_state_untouched(flower_identity, secure_config, tmp_path,
                                                                          deployed_grid):
    """A setup Flower's mod throws on (no max weight) keeps Flower's state as it was; fedslm's record of
    the session must not move either, else later stages of the new session would run on the old
    session's keys and shares (a hostile review's attack). Node 11 refuses; the others go on."""
    import fedslm.node.secagg as node_secagg

    cfg = secure_config("privacy.noise_seed=null")
    grid = deployed_grid(cfg, tamper={(Stage.SETUP, NODES[0]): lambda configs: configs.pop(Key.MAX_WEIGHT)})
    recorder, _, _, _ = _deployed_round(cfg, tmp_path, grid)
    assert recorder.pending[1]["secure_aggregation"]["contributors"] == NODES[1:]
    assert node_secagg.STATE not in grid.contexts[NODES[0]].state.config_records
    assert node_secagg.STATE in grid.contexts[NODES[1]].state.config_records


def test_a_masked_release_is_never_sent_twice(flower_identity, secure_config, tmp_path, deployed_grid):
    """After a secure round, the same request (run, round, adapter) again: among the same neighbours (one of
    whom the coordinator could drop before it masks, so that the difference of the two sums is that
    node's update), in a cohort with a node swapped, or in the clear (with a config that says secure
    aggregation is off), it is refused, and nothing is charged again."""
    cfg = secure_config("privacy.noise_seed=null")
    grid = deployed_grid(cfg)
    recorder, initial, messages, _ = _deployed_round(cfg, tmp_path, grid)
    # Deployed nodes mask in a protocol their policies accept: 0.75 of 4 shares, more than half.
    assert recorder.pending[1]["secure_aggregation"]["contributors"] == NODES
    assert recorder.pending[1]["secure_aggregation"]["threshold"] == 3

    def entries(n):
        return [e["round"] for e in Ledger(tmp_path / f"ledger-{n}.json").entries("all-records")]

    (tmp_path / "again").mkdir()
    # A new Flower run (a relaunched coordinator: the same fedslm run and round, another run id, which the
    # session record beside each ledger lets through) in fresh protocol state, same nodes and ledgers.
    flower_identity.run_id = 2
    again = deployed_grid(cfg)
    recorder1 = RunRecorder(cfg, tmp_path / "again", "run-s")
    _, again_messages = _train_messages(cfg, again, make_strategies(cfg, recorder1)[0])
    with pytest.raises(FederationStopped):
        secagg.SecureAggregationGrid(again, cfg, recorder1).send_and_receive(again_messages)
    refusals = {e["node"]: e["reason"] for e in recorder1.rounds[-1]["errors"]}
    assert all(refusals[n] == public_reason("refused-by-policy") for n in NODES)
    assert all(entries(n) == [1] for n in NODES)

    flower_identity.run_id = 3
    swapped = deployed_grid(cfg, nodes=[*NODES[:3], 15])  # same institutions 11-13, a new neighbour 15
    recorder2 = RunRecorder(cfg, tmp_path / "swapped", "run-s")
    (tmp_path / "swapped").mkdir()
    _, swapped_messages = _train_messages(cfg, swapped, make_strategies(cfg, recorder2)[0])
    with pytest.raises(FederationStopped):
        secagg.SecureAggregationGrid(swapped, cfg, recorder2).send_and_receive(swapped_messages)
    refusals = {e["node"]: e["reason"] for e in recorder2.rounds[-1]["errors"]}  # written when it stopped
    assert all(refusals[n] == public_reason("refused-by-policy") for n in NODES[:3])
    assert all(entries(n) == [1] for n in NODES[:3])

    clear = secure_config("privacy.noise_seed=null", "federation.secure_aggregation=false")
    plain = [m for m in copy.deepcopy(messages) if m.metadata.dst_node_id == NODES[0]]
    plain[0].content[codec.CONFIG]["fedslm-config"] = to_yaml(clear)
    (reply,) = grid.send_and_receive(plain)  # the same run, round and adapter, outside the protocol
    assert reply.has_error() and reply.error.reason == public_reason("refused-by-policy")
    assert entries(NODES[0]) == [1]


# -- distributed noise (fedslm.privacy.distributed) ------------------------------------------------

DISTRIBUTED = ("lora.layers=0", "lora.head_bias=false", "train.full_batch=true", "train.local_steps=1",
               "train.optimizer=sgd", "train.lr=5", "privacy.max_grad_norm=0.5", "privacy.target_epsilon=4",
               "federation.secagg.distributed_noise=true", "privacy.distributed.honest=3", "privacy.delta=1e-4")


def test_distributed_noise_sums_the_nodes_lattice_vectors_exactly_and_charges_the_sum_and_each_alone(
        flower_identity, secure_config, tmp_path, monkeypatch):
    from fedslm.privacy import distributed

    cfg = secure_config(*DISTRIBUTED)
    totals = []
    real = distributed.from_wire
    monkeypatch.setattr(distributed, "from_wire", lambda *a, **k: totals.append(real(*a, **k)) or totals[-1])
    grid, recorder, initial, average, replies = _secure_round(cfg, tmp_path)
    released = [_released(tmp_path, n, initial) for n in NODES]
    lattice = distributed.Lattice(bits=cfg.federation.secagg.lattice_bits, honest=1, max_epsilon_alone=1.0,
                                  levels=wire_secagg.quantization_range(cfg),
                                  clipping_range=cfg.federation.secagg.clipping_range)
    gamma, lr = lattice.scale(cfg.privacy.max_grad_norm), cfg.train.lr
    (key,) = [k for k in initial if not torch.equal(released[0][0][k], initial[k])]  # the head's weight alone moved
    # Each node's integer vector K, read back from the state it kept: state = global - lr K / (γ n).
    ks = [torch.round((initial[key].double() - s[key].double()) * gamma * m["num-examples"] / lr).long()
          for s, m in released]
    # SecAgg+ delivered ΣK exactly; the frozen bias (no data in it, no noise) sums to exactly 0.
    names = list(initial)
    assert len(totals) == len(names) and np.array_equal(totals[names.index(key)], sum(ks).numpy())
    assert all(not t.any() for i, t in enumerate(totals) if names[i] != key)
    n = sum(m["num-examples"] for _, m in released)
    expected = initial[key].double() - lr * sum(ks).double() / (gamma * n)
    assert torch.allclose(average[key].double(), expected, rtol=0, atol=1e-6)
    assert float((expected - initial[key].double()).abs().max()) > 1e-3  # it moved
    sent = {int(screened(r)["institution"]): screened(r) for r in replies}
    for node in NODES:
        metrics = sent[NODES.index(node)]
        (entry,) = _ledger(tmp_path, node).entries("all-records")
        assert entry["mechanism"] == "skellam" and entry["honest"] == 3 and entry["l2"] > 2 ** 13
        # The share: a third of the sum's variance, so ε of this node's noise alone is well above the sum's.
        assert metrics["epsilon"] <= 4 + 1e-6 < metrics["epsilon-alone"]
        spread = float((ks[NODES.index(node)] - torch.round(ks[NODES.index(node)].double().mean())).double().std())
        assert spread > 0.5 * math.sqrt(entry["mu"])  # the noise is there, at about its planned size
    # The run record keeps both figures per institution (summary.json's privacy, the simulation's last line).
    recorded = list(recorder.pending[1]["clients"].values())
    assert len(recorded) == len(NODES) and all(c["epsilon_alone"] > c["epsilon"] for c in recorded)


def test_distributed_noise_is_refused_outside_the_head_only_full_batch_recipe(secure_config):
    with pytest.raises(ConfigError, match="lora.layers=0, train.full_batch=true"):
        secure_config(*DISTRIBUTED, "train.local_steps=2")
    with pytest.raises(ConfigError, match="train.optimizer=sgd"):
        secure_config(*DISTRIBUTED, "train.optimizer=adamw")
    with pytest.raises(ConfigError, match="clipping_range must be a power of two"):
        secure_config(*DISTRIBUTED, "federation.secagg.clipping_range=0.3")
    with pytest.raises(ConfigError, match="privacy.distributed.honest=4"):
        secure_config(*DISTRIBUTED, "privacy.distributed.honest=4")
    with pytest.raises(ConfigError, match="secure_aggregation=true"):
        secure_config(*DISTRIBUTED, "federation.secure_aggregation=false")
    with pytest.raises(ConfigError, match="needs one privacy.delta for every node"):
        secure_config(*DISTRIBUTED, "privacy.delta=null")


@pytest.mark.parametrize("lost", [None, NODES[1]], ids=["all-four", "one-lost-before-masking"])
def test_deployed_nodes_add_the_share_their_policy_trusts_and_unmask_only_among_that_many(
        flower_identity, secure_config, tmp_path, deployed_grid, caplog, lost):
    """Each policy counts on 4 honest contributors (the request's privacy.distributed.honest=3 is not the
    node's to take): every ledger entry is a quarter-share at honest=4. With one node lost before it
    masked, 3 survivors are fewer than the 4 the policy's min_cohort demands: no node signs the list,
    nothing is unmasked, and the round stops."""
    import logging

    cfg = secure_config("privacy.noise_seed=null", *DISTRIBUTED)
    trust = {"assume_honest": 4, "max_epsilon_alone": 60.0, "require_secure_noise": False}
    grid = deployed_grid(cfg, min_cohort=4, privacy=trust, size_is_public=True,  # full batch: n is public
                         drop={Stage.COLLECT_MASKED_VECTORS: lost} if lost else None)
    if lost is not None:
        with caplog.at_level(logging.WARNING, logger="fedslm.node.secagg"), \
                pytest.raises(FederationStopped, match="halted at stage unmask"):
            _deployed_round(cfg, tmp_path, grid)
        assert "below max(threshold, secure_aggregation.min_cohort) = 4" in caplog.text
        return
    recorder, _, _, replies = _deployed_round(cfg, tmp_path, grid)
    assert recorder.pending[1]["secure_aggregation"]["contributors"] == NODES
    for n in NODES:
        (entry,) = Ledger(tmp_path / f"ledger-{n}.json").entries("all-records")
        assert entry["mechanism"] == "skellam" and entry["honest"] == 4


def test_a_policy_that_counts_on_others_needs_a_cap_alone_a_cohort_that_large_and_known_peers(tmp_path, node_policy,
                                                                                              class_csv):
    import yaml

    from fedslm.node.policy import PolicyError, load_policy

    def policy(secure=None, **privacy):
        path = node_policy(data=class_csv, **privacy)
        if secure is not None:
            path.write_text(path.read_text() + yaml.safe_dump({"secure_aggregation": secure}))
        return str(path)

    for name in ("me", "b", "c"):
        _identity(tmp_path, name)
    known = {"identity_key": "keys/nme.key", "peers": {"b": "keys/nb.key.pub", "c": "keys/nc.key.pub"}}
    with pytest.raises(PolicyError, match="privacy.max_epsilon_alone is required"):
        load_policy(policy(known, assume_honest=3))
    with pytest.raises(PolicyError, match="min_cohort=3 must be at least privacy.assume_honest=4"):
        load_policy(policy(known, assume_honest=4, max_epsilon_alone=20.0))
    with pytest.raises(PolicyError, match="needs secure_aggregation.identity_key, the other institutions"):
        load_policy(policy(None, assume_honest=3, max_epsilon_alone=20.0))
    with pytest.raises(PolicyError, match="max_unverified_share=0"):
        load_policy(policy({**known, "max_unverified_share": 0.2}, assume_honest=3, max_epsilon_alone=20.0))
    assert load_policy(policy(known, assume_honest=3, max_epsilon_alone=20.0)).privacy.assume_honest == 3


@pytest.mark.parametrize("edit,refusal", [
    (("lattice_bits: 13", "lattice_bits: 5"), "added their noise on another lattice or other tensors"),
    (("head_bias: false", "head_bias: true"), "added their noise on another lattice or other tensors"),
    (("target_epsilon: 4.0", "target_epsilon: 1.0"), "of the variance node 13's plan needs in the sum"),
], ids=["smaller-lattice", "bias-trained", "stricter-epsilon"])
def test_no_node_unmasks_a_sum_whose_noise_falls_short_of_any_plan_in_it(flower_identity, secure_config, tmp_path,
                                                                        deployed_grid, caplog, edit, refusal):
    """The coordinator sends node 13 another request. On 2**8 times smaller lattice units its noise would be
    tiny on the others' lattice; with its bias trained, the others' bias coordinates would carry their own
    share alone; asked for ε = 1 it needs more noise in the sum than the others' shares give it, and its
    own refusal would not save it (the others hold a threshold of its shares). Each node signed its
    lattice, share, need and trust with the survivor list, and no node unmasks: the round stops."""
    import logging

    cfg = secure_config("privacy.noise_seed=null", *DISTRIBUTED)

    def tampered(records):
        records[codec.CONFIG]["fedslm-config"] = str(records[codec.CONFIG]["fedslm-config"]).replace(*edit)

    grid = deployed_grid(cfg, min_cohort=4, size_is_public=True,
                         privacy={"assume_honest": 4, "max_epsilon_alone": 60.0, "require_secure_noise": False},
                         tamper_records={(Stage.COLLECT_MASKED_VECTORS, NODES[2]): tampered})
    with caplog.at_level(logging.WARNING, logger="fedslm.node.secagg"), \
            pytest.raises(FederationStopped, match="halted at stage unmask"):
        _deployed_round(cfg, tmp_path, grid)
    assert refusal in caplog.text
    (entry,) = Ledger(tmp_path / f"ledger-{NODES[2]}.json").entries("all-records")
    (other,) = Ledger(tmp_path / f"ledger-{NODES[0]}.json").entries("all-records")
    assert (entry["l2"], entry["mu"]) != (other["l2"], other["mu"])  # node 13 really trained as tampered


def test_a_node_refuses_a_setup_whose_max_weight_would_scale_its_lattice_vector_away(flower_identity, secure_config,
                                                                                      tmp_path, deployed_grid):
    """A huge max weight in Flower's setup makes the mod multiply a node's vector by ~0 (a constant the sum
    gives away): the node compares the setup with its plan and refuses before it trains or pays."""
    cfg = secure_config("privacy.noise_seed=null", *DISTRIBUTED)

    def huge(configs):
        configs[Key.MAX_WEIGHT] = 1e15

    grid = deployed_grid(cfg, size_is_public=True, privacy={"require_secure_noise": False},
                         tamper={(Stage.SETUP, NODES[0]): huge})
    recorder, _, _, _ = _deployed_round(cfg, tmp_path, grid)
    assert recorder.pending[1]["secure_aggregation"]["contributors"] == NODES[1:]
    assert not (tmp_path / f"ledger-{NODES[0]}.json").exists()
    assert all((tmp_path / f"ledger-{n}.json").exists() for n in NODES[1:])


def test_distributed_noise_draws_its_rounding_and_noise_from_the_os_when_the_policy_requires_it(
        flower_identity, secure_config, tmp_path, deployed_grid, monkeypatch):
    """Deployed nodes require OS-CSPRNG noise by default: the lattice's rounding uniforms come from os.urandom
    and the Skellam noise from a sampler keyed by it, never from torch's seeded generator."""
    from fedslm.privacy import csprng

    calls = {"bits": 0, "keyed": 0}
    bits, keyed = csprng.bits53, csprng.keyed_generator
    monkeypatch.setattr(csprng, "bits53", lambda n: calls.__setitem__("bits", calls["bits"] + 1) or bits(n))
    monkeypatch.setattr(csprng, "keyed_generator", lambda: calls.__setitem__("keyed", calls["keyed"] + 1) or keyed())
    monkeypatch.setattr(torch, "poisson", None)  # torch's generator-driven sampler must not be reached
    cfg = secure_config("privacy.noise_seed=null", *DISTRIBUTED)
    grid = deployed_grid(cfg, privacy={"require_secure_noise": True}, size_is_public=True)
    recorder, _, _, _ = _deployed_round(cfg, tmp_path, grid)
    assert recorder.pending[1]["secure_aggregation"]["contributors"] == NODES
    assert calls["bits"] >= len(NODES) and calls["keyed"] >= len(NODES)


def test_a_simulated_sum_of_fewer_vectors_than_the_honest_count_is_never_unmasked(flower_identity, secure_config,
                                                                                  tmp_path):
    """Simulated nodes check nothing themselves (the scenario stands for their policies): the coordinator stops a
    round whose sum would hold fewer vectors than privacy.distributed.honest, whose noise each ledger charges for."""
    cfg = secure_config(*DISTRIBUTED, "federation.min_clients=4", "privacy.distributed.honest=4")
    with pytest.raises(FederationStopped, match="3 vectors in the sum, fewer than privacy.distributed.honest=4"):
        _secure_round(cfg, tmp_path, drop={Stage.COLLECT_MASKED_VECTORS: NODES[1]})


def _plan_state(share, need, honest, masked, lattice="L"):
    from fedslm.node import secagg as node_secagg

    own = {node_secagg.MASKED_WITH: masked}
    if lattice is not None:
        own.update({node_secagg.NOISE_LATTICE: lattice, node_secagg.NOISE_SHARE: share,
                    node_secagg.NOISE_NEED: need, node_secagg.NOISE_HONEST: honest})
    return own


def test_the_honest_shares_are_the_smallest_over_every_survivor_not_the_neighbourhood():
    """Flower unmasks one sum over all survivors; a neighbourhood {1, 2, 3} of it may hold a colluder (2) stating a
    share it never added. Counting the k - 1 smallest among the neighbours alone would count that lie; over every
    survivor (0 for those with no statement this node can read) it cannot."""
    from fedslm.node.secagg import SecureAggregationRefused, check_noise_shares

    own = _plan_state(10 / 3, 10.0, 3, [1, 2, 3])
    statements = {2: ("L", 1e9, 0.0, 1), 3: ("L", 10 / 3, 10.0, 3)}
    with pytest.raises(SecureAggregationRefused, match="of the variance this node's plan needs"):
        check_noise_shares(own, [1, 2, 3, 4, 5], statements, 1)
    check_noise_shares(own, [1, 2, 3], statements, 1)  # the same shares when the sum is the neighbourhood: enough


def test_a_node_in_a_local_dp_round_unmasks_no_sum_that_holds_distributed_noise():
    """The coordinator could ask one neighbour for local DP so that it gives out shares without checking anyone's
    plan: a node with no lattice of its own refuses a sum in which a neighbour stated distributed noise."""
    from fedslm.node.secagg import SecureAggregationRefused, check_noise_shares

    with pytest.raises(SecureAggregationRefused, match="asked for a local-DP round"):
        check_noise_shares(_plan_state(0, 0, 1, [1, 2, 3], lattice=None), [1, 2, 3], {2: ("L", 1.0, 3.0, 3)}, 1)
    check_noise_shares(_plan_state(0, 0, 1, [1, 2, 3], lattice=None), [1, 2, 3], {}, 1)  # local DP among local DP


def test_a_listed_institution_cannot_sign_another_nodes_survivor_list_or_noise_statement(
        flower_identity, secure_config, tmp_path, deployed_grid, caplog):
    """Institution n14 (colluding with the coordinator) signs, for node 12, a statement that it added a huge share
    and needs nothing, and the coordinator drops node 12's own entry. Only the institution that signed node 12's
    round keys can sign for node 12: the forged entry counts nothing, node 12 counts as not having signed, and no
    node unmasks."""
    import logging

    from fedslm.wire import identity

    cfg = secure_config("privacy.noise_seed=null", *DISTRIBUTED)
    victim, colluder = NODES[1], NODES[3]

    def forge(msg):
        record = msg.content.config_records[identity.CONSISTENCY]
        survivors = [int(n) for n in record[identity.SURVIVORS]]
        entry = [bytes(v) for v in record[str(colluder)]]
        lattice = identity.read_noise_statement(entry[2])[0]
        fake = identity.noise_statement(lattice, 1e12, 0.0, 1)
        key = identity.load_private(_identity(tmp_path, colluder))
        raw, sig = identity.sign(key, identity.survivors_bytes(msg.metadata.run_id, msg.metadata.group_id, victim,
                                                               survivors, fake))
        record[str(victim)] = [raw, sig, fake]

    grid = deployed_grid(cfg, min_cohort=4, size_is_public=True,
                         privacy={"assume_honest": 4, "max_epsilon_alone": 60.0, "require_secure_noise": False},
                         tamper_message={(Stage.UNMASK, n): forge for n in NODES if n != victim})
    with caplog.at_level(logging.WARNING, logger="fedslm.node.secagg"), \
            pytest.raises(FederationStopped, match="halted at stage unmask"):
        _deployed_round(cfg, tmp_path, grid)
    # Nodes 11, 13 and 14 each find node 12 unsigned; none takes the colluder's entry as node 12's (had one,
    # it would find node 14's own entry a second signature of n14 and name node 14 instead).
    assert caplog.text.count(f"nodes [{victim}] are listed alive but did not sign the survivor list") == 3
    assert f"nodes [{colluder}] are listed alive" not in caplog.text


def test_a_node_counting_on_others_masks_only_with_neighbours_that_check_every_neighbour(
        flower_identity, secure_config, tmp_path, deployed_grid, caplog):
    """Neighbours that allow unverified neighbours (max_unverified_share 0.4) could be made to treat a node as
    unverified (the coordinator strips its identity) and skip its noise plan: they do not sign the promise to
    check, and the node that counts on others' noise (assume_honest 4) refuses to share its secrets with them,
    before it trains or pays."""
    import logging

    import yaml

    cfg = secure_config("privacy.noise_seed=null", *DISTRIBUTED)
    victim = NODES[2]
    grid = deployed_grid(cfg, max_unverified_share=0.4, size_is_public=True, privacy={"require_secure_noise": False})
    path = tmp_path / f"policy-{victim}.yaml"
    policy = yaml.safe_load(path.read_text())
    policy["privacy"].update(assume_honest=4, max_epsilon_alone=60.0)
    policy["secure_aggregation"].update(max_unverified_share=0.0, min_cohort=4)
    path.write_text(yaml.safe_dump(policy))
    with caplog.at_level(logging.WARNING, logger="fedslm.node.secagg"):
        recorder, _, _, _ = _deployed_round(cfg, tmp_path, grid)
    assert "did not sign that they check distributed-noise plans" in caplog.text
    assert recorder.pending[1]["secure_aggregation"]["contributors"] == [n for n in NODES if n != victim]
    assert not (tmp_path / f"ledger-{victim}.json").exists()


def test_a_node_counting_on_others_refuses_a_sparse_graph(flower_identity, secure_config, tmp_path, deployed_grid,
                                                         caplog):
    """Its check needs every survivor's statement: with shares < 1 some survivors are not its neighbours."""
    import logging

    cfg = secure_config("privacy.noise_seed=null", *DISTRIBUTED, "federation.secagg.shares=0.75")
    grid = deployed_grid(cfg, size_is_public=True, min_cohort=3,
                         privacy={"assume_honest": 3, "max_epsilon_alone": 60.0, "require_secure_noise": False})
    with caplog.at_level(logging.WARNING, logger="fedslm.node.secagg"), \
            pytest.raises(FederationStopped, match="halted at stage setup"):
        _deployed_round(cfg, tmp_path, grid)
    assert "which it can check only when every survivor is its neighbour" in caplog.text


def test_a_node_guarding_against_colluders_needs_a_threshold_above_half_of_shares_plus_colluders(
        flower_identity, secure_config, tmp_path, deployed_grid, caplog):
    """A colluding institution signs and answers for every survivor list, so two stories each need a majority that
    counts it twice: with 2 colluders, a threshold of 3 of 4 shares lets a coordinator rebuild both secrets of a
    node from two parts of the cohort. Every node refuses at setup, before it trains or pays; threshold 4 of 4 runs."""
    import logging

    cfg = secure_config("privacy.noise_seed=null")
    with caplog.at_level(logging.WARNING, logger="fedslm.node.secagg"), \
            pytest.raises(FederationStopped, match="halted at stage setup"):
        _deployed_round(cfg, tmp_path, deployed_grid(cfg, max_colluding=2))
    assert "2 x threshold must exceed shares + colluders" in caplog.text
    assert not any((tmp_path / f"ledger-{n}.json").exists() for n in NODES)
    cfg = secure_config("privacy.noise_seed=null", "federation.secagg.threshold=1.0")
    recorder, _, _, _ = _deployed_round(cfg, tmp_path, deployed_grid(cfg, max_colluding=2))
    assert recorder.pending[1]["secure_aggregation"]["contributors"] == NODES


def test_max_colluding_is_bounded_by_the_peers_and_adds_to_the_cohort_a_node_counts_on(tmp_path, node_policy,
                                                                                        class_csv):
    import yaml

    from fedslm.node.policy import PolicyError, load_policy

    for name in ("me", "b", "c"):
        _identity(tmp_path, name)
    known = {"identity_key": "keys/nme.key", "peers": {"b": "keys/nb.key.pub", "c": "keys/nc.key.pub"},
             "max_unverified_share": 0.0}

    def policy(secure, **privacy):
        path = node_policy(data=class_csv, **privacy)
        path.write_text(path.read_text() + yaml.safe_dump({"secure_aggregation": secure}))
        return str(path)

    with pytest.raises(PolicyError, match="max_colluding=2 must be below the 2 institutions"):
        load_policy(policy({**known, "max_colluding": 2}))
    with pytest.raises(PolicyError, match="must be at least privacy.assume_honest=3 plus secure_aggregation.max_colluding=1"):
        load_policy(policy({**known, "max_colluding": 1, "min_cohort": 3}, assume_honest=3, max_epsilon_alone=20.0))
    assert load_policy(policy({**known, "max_colluding": 1, "min_cohort": 4}, assume_honest=3,
                              max_epsilon_alone=20.0)).secure_aggregation.max_colluding == 1


@pytest.mark.parametrize("laxer", ["fewer-colluders", "another-threshold"])
def test_nodes_guarding_against_colluders_mask_only_with_neighbours_that_enforce_the_same_bounds(
        flower_identity, secure_config, tmp_path, deployed_grid, caplog, laxer):
    """A node's secrets are held by its neighbours: one that counts fewer colluders, or was sent another
    threshold, would give out shares under a laxer majority. Each node signs its protocol and collusion bound
    with its round keys; the others refuse at share-keys, before anyone trains or pays."""
    import logging

    import yaml

    cfg = secure_config("privacy.noise_seed=null")
    odd = NODES[3]
    tamper = {}
    grid_kwargs = {}
    if laxer == "another-threshold":
        def lower(configs):
            configs[Key.THRESHOLD] = 4
        tamper = {(Stage.SETUP, odd): lower}
        grid_kwargs = {"tamper": tamper}
    grid = deployed_grid(cfg, max_colluding=1, **grid_kwargs)
    if laxer == "fewer-colluders":
        path = tmp_path / f"policy-{odd}.yaml"
        policy = yaml.safe_load(path.read_text())
        policy["secure_aggregation"]["max_colluding"] = 0
        path.write_text(yaml.safe_dump(policy))
    with caplog.at_level(logging.WARNING, logger="fedslm.node.secagg"), pytest.raises(FederationStopped):
        _deployed_round(cfg, tmp_path, grid)
    assert "signed another threshold, share count or cohort than this node's setup, fewer colluders" in caplog.text
    assert not any((tmp_path / f"ledger-{n}.json").exists() for n in NODES)


def test_unverified_neighbours_and_colluders_together_stay_below_the_threshold(flower_identity, secure_config,
                                                                             tmp_path, deployed_grid, caplog):
    """With threshold 3, one unverified neighbour is allowed when no institution colludes (it plus this node's own
    share stay below 3); guarding against one colluder, the colluder fills that place, and the node refuses."""
    import logging

    cfg = secure_config("privacy.noise_seed=null")
    listed = {n: [m for m in NODES[:3] if m != n] for n in NODES[:3]}  # node 14 is listed by no one
    grid = deployed_grid(cfg, max_unverified_share=0.4, max_colluding=1, peers=listed)
    with caplog.at_level(logging.WARNING, logger="fedslm.node.secagg"), pytest.raises(FederationStopped):
        _deployed_round(cfg, tmp_path, grid)
    assert "carry no signature of an institution in secure_aggregation.peers" in caplog.text


def test_distributed_noise_refuses_a_fedprox_term_before_anything_is_charged(secure_config, tmp_path):
    """The head engine releases the noised gradient sum itself; a request's proximal-mu would be dropped without a
    word, so the node refuses the round, and its ledger stays untouched."""
    from dataclasses import replace

    from fedslm.errors import DataError
    from fedslm.train import round_spec, train_round
    from fedslm.wire.secagg import distributed_lattice

    cfg = secure_config(*DISTRIBUTED)
    node = build_node(cfg)
    spec = round_spec(cfg)
    spec = replace(spec, dp=replace(spec.dp, lattice=distributed_lattice(cfg)))
    ledger = Ledger(tmp_path / "l.json")
    with pytest.raises(DataError, match="FedProx"):
        train_round(node.model, node.train, spec, unit="u", ledger=ledger, proximal_mu=0.1,
                    features=node.train_features)
    assert not ledger.path.exists()
    train_round(node.model, node.train, spec, unit="u", ledger=ledger, features=node.train_features)
    assert ledger.entries("u")[0]["mechanism"] == "skellam"
