"""Federation: payload audit through the real ClientApp, aggregation against np.average,
error replies, and a real 3-institution simulation (Flower simulation engine) on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import psutil
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from peft import PeftModel

import clients.app as client_app
from fedslm.config import to_yaml
from fedslm.federation import codec
from fedslm.federation.server import FederationStopped, RunRecorder, make_strategy
from fedslm.federation.simulate import simulate
from fedslm.lora import get_adapter_state, trainable_parameters
from fedslm.models import load_base
from fedslm.train import build_node


@pytest.fixture
def flower_identity():
    """Messages need the process' task identity, as Flower's runtimes set it."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield TaskIdentity
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _request(cfg, state, fingerprint, node_id=2, mtype=MessageType.TRAIN):
    TaskIdentity.node_id = 1
    content = RecordDict({
        codec.ARRAYS: codec.state_to_record(state),
        codec.CONFIG: ConfigRecord({**codec.request_config(to_yaml(cfg), fingerprint, "run-x"), "server-round": 1}),
    })
    return Message(content, dst_node_id=node_id, message_type=mtype)


def _context(node_config):
    return Context(run_id=1, node_id=2, node_config=node_config, state=RecordDict(), run_config={})


def test_clientapp_reply_carries_only_the_adapter(flower_identity, cls_config, tmp_path):
    cfg = cls_config("federation.num_clients=2", "federation.partitioner=iid")
    node = build_node(cfg)
    state = get_adapter_state(node.model)
    msg = _request(cfg, state, node.base.fingerprint)
    TaskIdentity.node_id = 2
    reply = client_app.train(msg, _context({"partition-id": 0, "num-partitions": 2}))
    assert not reply.has_error(), reply.error
    arrays = reply.content[codec.ARRAYS]
    assert set(reply.content.keys()) == {codec.ARRAYS, codec.METRICS}
    assert set(arrays.keys()) == set(state)  # exactly the adapter + head keys, nothing of the base
    assert len(arrays.keys()) == len(trainable_parameters(node.model))
    assert all("lora_" in k or "classifier" in k for k in arrays.keys())
    metrics = reply.content[codec.METRICS]
    assert metrics["bytes-up"] == sum(t.numel() * t.element_size() for t in state.values())
    assert metrics["bytes-up"] == codec.tensor_bytes(codec.record_to_state(arrays))
    assert 0 < metrics["epsilon"] <= cfg.privacy.target_epsilon
    assert metrics["num-examples"] > 0


def test_clientapp_refuses_a_different_base_with_a_reason(flower_identity, cls_config):
    cfg = cls_config("federation.num_clients=2", "federation.partitioner=iid")
    node = build_node(cfg)
    msg = _request(cfg, get_adapter_state(node.model), "0" * 64)
    TaskIdentity.node_id = 2
    reply = client_app.train(msg, _context({"partition-id": 1, "num-partitions": 2}))
    assert reply.has_error() and "fingerprint" in reply.error.reason


def test_clientapp_bad_data_replies_with_the_reason(flower_identity, cls_config, tmp_path):
    bad = tmp_path / "broken.csv"
    bad.write_bytes(b"text,label\nfever,resp\n\xff\xfe,cardio\n")
    cfg = cls_config("federation.num_clients=2", "federation.partitioner=iid")
    node = build_node(cfg)
    msg = _request(cfg, get_adapter_state(node.model), node.base.fingerprint)
    TaskIdentity.node_id = 2
    reply = client_app.train(msg, _context({"data-source": str(bad)}))
    assert reply.has_error()
    assert "broken.csv line 3" in reply.error.reason and "not UTF-8" in reply.error.reason


def _train_request_to(node_id):
    TaskIdentity.node_id = 1
    req = Message(RecordDict({codec.CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=node_id,
                  message_type=MessageType.TRAIN)
    TaskIdentity.node_id = node_id  # the reply is sent by that node
    return req


def _error_reply(node_id, reason):
    return Message(error=Error(code=client_app.NODE_REFUSED, reason=reason), reply_to=_train_request_to(node_id))


def _train_reply(node_id, arrays, num_examples, institution):
    req = _train_request_to(node_id)
    return Message(RecordDict({
        codec.ARRAYS: ArrayRecord(arrays),
        codec.METRICS: MetricRecord({"num-examples": num_examples, "institution": institution, "train-loss": 1.0,
                                     "epsilon": 1.0, "delta": 1e-5, "bytes-up": 1, "bytes-down": 1}),
    }), reply_to=req)


def test_fedavg_equals_np_average_weighted_by_examples(flower_identity, cls_config, tmp_path):
    cfg = cls_config("federation.min_clients=2")
    rng = np.random.default_rng(0)
    updates = [[rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=5).astype(np.float32)] for _ in range(3)]
    weights = [10, 35, 7]
    replies = [_train_reply(n + 2, u, w, n) for n, (u, w) in enumerate(zip(updates, weights))]
    recorder = RunRecorder(cfg, tmp_path, "r")
    strategy = make_strategy(cfg, recorder)
    arrays, _ = strategy.aggregate_train(1, replies)
    got = arrays.to_numpy_ndarrays()
    for i in range(2):
        ref = np.average(np.stack([u[i] for u in updates]), axis=0, weights=weights)
        np.testing.assert_allclose(got[i], ref, rtol=1e-6)
    clients = recorder.pending[1]["clients"]
    assert sorted(c["num_examples"] for c in clients.values()) == sorted(weights)


def test_failed_replies_are_logged_and_too_few_stop_the_run(flower_identity, cls_config, tmp_path):
    cfg = cls_config("federation.min_clients=2")
    good = _train_reply(2, [np.ones(3, dtype=np.float32)], 5, 0)
    bad = _error_reply(3, "institution-1: data unreadable")
    recorder = RunRecorder(cfg, tmp_path, "r")
    strategy = make_strategy(cfg, recorder)
    with pytest.raises(FederationStopped, match="1 institution\\(s\\) replied.*data unreadable"):
        strategy.aggregate_train(1, [good, bad])
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert line["stopped"] and line["errors"][0]["node"] == 3


def _our_processes(port_marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if port_marker in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_three_institution_simulation_writes_the_run_folder(cls_config, tmp_path):
    out = tmp_path / "sim"
    cfg = cls_config(
        "federation.num_clients=3", "federation.rounds=2", "federation.min_clients=3",
        "federation.partitioner=iid", f"output.dir={out}", "privacy.target_epsilon=3",
    )
    summary = simulate(cfg)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "report.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "checkpoint/adapter.safetensors", "checkpoint/state.json"):
        assert (out / name).exists(), name
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert len(r["clients"]) == 3
        for c in r["clients"]:
            assert {"train_loss", "epsilon", "num_examples", "bytes_up", "bytes_down", "eval"} <= set(c)
            assert c["bytes_up"] == c["bytes_down"] == summary["bytes"]["adapter"]
        assert {"loss", "accuracy", "macro_f1"} <= set(r["eval_weighted"])
    for inst in range(3):  # ε grows round by round and never passes the target
        eps = [next(c["epsilon"] for c in r["clients"] if c["institution"] == inst) for r in rounds]
        assert eps[0] < eps[1] <= 3.0 + 1e-9
    assert summary["rounds_completed"] == 2
    assert set(summary["per_institution"]["accuracy"]) == {"0", "1", "2"}
    assert summary["worst_institution"]["accuracy"] == min(summary["per_institution"]["accuracy"].values())
    assert summary["bytes"]["adapter_over_model"] < 0.5
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["round"] == 2
    base = load_base(cfg.model, 3)
    PeftModel.from_pretrained(base.model, out / "adapter")
    assert not _our_processes(str(out))  # every process the run started is gone


def test_a_failed_node_is_logged_and_the_round_goes_on(flower_identity, cls_config, tmp_path):
    cfg = cls_config("federation.min_clients=2")
    good = [_train_reply(n, [np.full(3, float(n), dtype=np.float32)], 5, n) for n in (2, 3)]
    bad = _error_reply(4, "institution-2: missing column 'label'")
    recorder = RunRecorder(cfg, tmp_path, "r")
    arrays, _ = make_strategy(cfg, recorder).aggregate_train(1, [good[0], bad, good[1]])
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(3, 2.5))  # the two good nodes only
    assert recorder.pending[1]["errors"] == [{"phase": "train", "node": 4,
                                              "reason": "institution-2: missing column 'label'"}]


def test_malformed_updates_are_rejected_with_node_and_reason(flower_identity, cls_config, tmp_path):
    cfg = cls_config("federation.min_clients=2", "federation.max_update_norm=5.0")
    sent = {"a": np.zeros((4, 3), dtype=np.float32), "b": np.zeros(5, dtype=np.float32)}

    def reply(node, arrays):
        return _train_reply(node, {k: torch.from_numpy(v) for k, v in arrays.items()}, 10, node)

    good = [reply(2, {"a": np.full((4, 3), 0.1, np.float32), "b": np.full(5, 0.1, np.float32)}),
            reply(3, {"a": np.full((4, 3), 0.3, np.float32), "b": np.full(5, 0.3, np.float32)})]
    nan = sent["a"].copy()
    nan[0, 0] = np.nan
    bad = {
        4: ({"a": nan, "b": sent["b"]}, "NaN or inf"),
        5: ({"a": np.full((4, 3), np.inf, np.float32), "b": sent["b"]}, "NaN or inf"),
        6: ({"a": np.zeros((3, 4), np.float32), "b": sent["b"]}, "shape (3, 4), expected (4, 3)"),
        7: ({"a": sent["a"], "b": sent["b"], "base_model.weight": sent["b"]}, "unexpected ['base_model.weight']"),
        8: ({"a": sent["a"]}, "missing ['b']"),
        9: ({"a": np.full((4, 3), 100.0, np.float32), "b": sent["b"]}, "exceeds the bound 5"),
    }
    replies = [good[0], *[reply(n, arrays) for n, (arrays, _) in bad.items()], good[1]]
    recorder = RunRecorder(cfg, tmp_path, "r")
    strategy = make_strategy(cfg, recorder)
    strategy.sent = {k: torch.from_numpy(v) for k, v in sent.items()}
    arrays, _ = strategy.aggregate_train(1, replies)
    got = dict(zip(["a", "b"], arrays.to_numpy_ndarrays()))
    np.testing.assert_allclose(got["a"], np.full((4, 3), 0.2), rtol=1e-6)  # only the two good updates
    errors = {e["node"]: e["reason"] for e in recorder.pending[1]["errors"]}
    assert set(errors) == set(bad)
    for node, (_, why) in bad.items():
        assert why in errors[node] and errors[node].startswith("rejected update"), (node, errors[node])
