"""Federation: payload audit through the real ClientApp, aggregation against np.average,
error replies, and a real 3-institution simulation (Flower simulation engine) on a tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from peft import PeftModel

import fedslm.node.app as client_app
from fedslm.config import to_yaml
from fedslm.report import FINISHED
from fedslm.wire import codec
from fedslm.coordinator.server import (
    FederationStopped,
    RunFolderError,
    RunRecorder,
    find_checkpoint,
    make_strategies,
    make_strategy,
    run_server,
)
from fedslm.simulation.simulate import simulate
from fedslm.data import load_task_data
from fedslm.lora import get_adapter_state, set_adapter_state, trainable_parameters
from fedslm.lora.adapter import frozen_digest, read_adapter_meta
from fedslm.models import load_base
from fedslm.privacy import Ledger
from fedslm.node.releases import Releases
from fedslm.train import build_node
from fedslm.wire.errors import public_reason


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


def test_clientapp_refuses_a_different_base_with_its_category_only(flower_identity, cls_config):
    cfg = cls_config("federation.num_clients=2", "federation.partitioner=iid")
    node = build_node(cfg)
    msg = _request(cfg, get_adapter_state(node.model), "0" * 64)
    TaskIdentity.node_id = 2
    reply = client_app.train(msg, _context({"partition-id": 1, "num-partitions": 2}))
    assert reply.has_error() and reply.error.reason == public_reason("base-mismatch")
    assert node.base.fingerprint[:12] not in reply.error.reason


def test_clientapp_bad_data_replies_with_a_category_and_logs_the_details(flower_identity, cls_config, tmp_path,
                                                                         node_policy, caplog):
    bad = tmp_path / "broken.csv"
    bad.write_bytes(b"text,label\nfever,resp\n\xff\xfe,cardio\n")
    cfg = cls_config("federation.num_clients=2", "federation.partitioner=iid", "privacy.noise_seed=null")
    node = build_node(cfg)
    msg = _request(cfg, get_adapter_state(node.model), node.base.fingerprint)
    TaskIdentity.node_id = 2
    with caplog.at_level("WARNING", logger="fedslm.node"):
        reply = client_app.train(msg, _context({"policy": str(node_policy(cfg, data=bad))}))
    assert reply.has_error() and reply.error.reason == public_reason("node-misconfigured")
    assert "broken.csv" not in reply.error.reason
    assert "broken.csv line 3" in caplog.text and "not UTF-8" in caplog.text  # the operator reads it here


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
        codec.METRICS: MetricRecord({"num-examples": num_examples, "unit-weight": 1, "institution": institution,
                                     "train-loss": 1.0,
                                     "epsilon": 1.0, "delta": 1e-5, "bytes-up": 1, "bytes-down": 1}),
    }), reply_to=req)


def test_fedavg_equals_np_average_weighted_by_examples(flower_identity, cls_config, tmp_path):
    # Within the clamp on claimed weights (tests/test_hostile_institution.py): 35 is 3.5 x the lower median 10.
    cfg = cls_config("federation.min_clients=2", "federation.max_weight_ratio=4")
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
    """Live processes naming ``port_marker`` (a run folder) in their command line or environment (FLWR_HOME
    is inside the run folder, and every process Flower and Ray start inherits it)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if port_marker in " ".join(p.info["cmdline"] or []) or port_marker in p.environ().get("FLWR_HOME", ""):
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_three_institution_simulation_writes_the_run_folder(cls_config, tmp_path):
    """Also every privacy switch at once, through `fedslm simulate`: secure aggregation, client-level DP
    with client-side adaptive clipping, FFA-LoRA, secure noise; and a mean-pooled head."""
    out = tmp_path / "sim"
    cfg = cls_config(
        "federation.num_clients=3", "federation.rounds=2", "federation.min_clients=3",
        "federation.partitioner=iid", f"output.dir={out}", "privacy.target_epsilon=3",
        "privacy.client_level.enabled=true", "privacy.client_level.noise_multiplier=0.5",
        "privacy.client_level.clipping=client", "privacy.client_level.adaptive=true",
        "federation.secure_aggregation=true", "lora.ffa=true", "privacy.secure_mode=true", "privacy.noise_seed=null",
        "model.pooling=mean",
    )
    summary = simulate(cfg)
    # Both guarantees, separately: record-level per institution, client-level for the federation.
    assert set(summary["privacy"]["per_institution"]) == {"0", "1", "2"}
    cl = summary["privacy"]["client_level"]
    assert cl["rounds"] == 2 and cl["institutions_per_round"] == 3 and 0 < cl["epsilon"] < float("inf")
    assert summary["privacy"]["noise_source"].startswith("OS CSPRNG")
    assert cl["clipping"] == "client" and cl["adaptive"] and len(cl["clipping_norms"]) == 2
    assert cl["clipping_norms"][0] == cfg.privacy.client_level.clipping_norm != cl["clipping_norms"][1]
    sa = summary["privacy"]["secure_aggregation"]
    assert sorted(sa["rounds"]) == ["1", "2"]
    assert all(len(r["contributors"]) == 3 and r["dropped"] == [] for r in sa["rounds"].values())
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
            # Down: the adapter. Up: the masked update (64-bit integers per coordinate, plus keys).
            assert c["bytes_down"] == summary["bytes"]["adapter"] < c["bytes_up"] < 3 * c["bytes_down"] + 2**20
        assert {"loss", "accuracy", "macro_f1"} <= set(r["eval_weighted"])
    for inst in range(3):  # ε grows round by round and never passes the target
        eps = [next(c["epsilon"] for c in r["clients"] if c["institution"] == inst) for r in rounds]
        assert eps[0] < eps[1] <= 3.0 + 1e-9
    assert summary["rounds_completed"] == 2
    assert set(summary["per_institution"]["accuracy"]) == {"0", "1", "2"}
    assert summary["worst_institution"]["accuracy"] == min(summary["per_institution"]["accuracy"].values())
    # Per-class counts of the final adapter at each institution: their diagonal is the accuracy it reported.
    per_class = summary["per_class"]["per_institution"]
    for inst, acc in summary["per_institution"]["accuracy"].items():
        counts = per_class[inst]["confusion"]
        total = sum(map(sum, counts))
        final = next(c for c in rounds[-1]["clients"] if c["institution"] == int(inst))
        assert total == final["eval"]["num_examples"]
        assert sum(counts[c][c] for c in range(len(counts))) / total == pytest.approx(acc, abs=1e-9)
    page = (out / "report.html").read_text()
    assert "Per-class accuracy of the global model" in page and 'http-equiv="refresh"' not in page
    assert summary["bytes"]["adapter_over_model"] < 0.5
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["round"] == 2
    base = load_base(cfg.model, 3)
    assert summary["base_fingerprint"] == base.fingerprint  # every node and the coordinator pooled by mean
    assert read_adapter_meta(out / "adapter")["pooling"] == "mean"
    PeftModel.from_pretrained(base.model, out / "adapter")
    assert not _our_processes(str(out))  # every process the run started is gone
    # The ServerApp finished its run folder (the signal that Flower's own wind-down is not waited for).
    assert (out / FINISHED).read_text() == summary["run_id"]


def test_a_simulation_stopped_by_sigterm_stops_every_process_it_started(cls_config, tmp_path):
    """`kill` (SIGTERM) of `fedslm simulate` mid-run unwinds like Ctrl-C: the SuperLink, Flower's simulation
    and Ray's processes go with it (by default SIGTERM ended the CLI alone and they lived on)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sim"
    cfg = cls_config("federation.num_clients=2", "federation.rounds=500", "federation.min_clients=2",
                     "federation.partitioner=iid", f"output.dir={out}")
    path = tmp_path / "scenario.yaml"
    path.write_text(to_yaml(cfg), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "fedslm.cli.main", "simulate", "--config", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").exists():  # the federation is running: Ray's actors are up
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        assert _our_processes(str(out))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        time.sleep(0.5)
        assert not _our_processes(str(out))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in _our_processes(str(out)):
            p.kill()


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
    padded = reply(10, {"a": sent["a"], "b": sent["b"]})  # a valid update carrying 2 MiB of padding
    padded.content["padding"] = ConfigRecord({"blob": b"\0" * 2**21})
    replies.append(padded)
    bad[10] = (None, "oversized message")
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


def test_a_repeated_round_is_answered_from_the_paid_update_without_a_new_charge(flower_identity, cls_config):
    """After a coordinator restart, the same (run, round, adapter) gets the same bytes and no new ledger entry;
    a different adapter for that round is trained and charged anew."""
    cfg = cls_config("federation.num_clients=2", "federation.partitioner=iid")
    node = build_node(cfg)
    state = get_adapter_state(node.model)
    context = _context({"partition-id": 0, "num-partitions": 2})
    msg = _request(cfg, state, node.base.fingerprint)
    TaskIdentity.node_id = 2
    first = client_app.train(msg, context)
    ledger = Ledger(Path(cfg.output.dir) / "ledgers" / "institution-0.json")
    (spend,) = ledger.summary()
    assert spend.rounds == 1
    again = client_app.train(_request(cfg, state, node.base.fingerprint), context)
    assert not again.has_error(), again.error
    assert ledger.summary()[0].rounds == 1  # no second charge
    for key, value in codec.reply_state(first).items():
        assert torch.equal(codec.reply_state(again)[key], value)
    assert again.content[codec.METRICS]["replayed"] == 1
    # Same metric keys as a fresh reply: Flower's FedAvg refuses to aggregate a mix of key sets.
    assert set(again.content[codec.METRICS].keys()) == set(first.content[codec.METRICS].keys())
    assert again.content[codec.METRICS]["epsilon"] == pytest.approx(spend.epsilon)
    # The same round with another adapter is a new request: trained and charged.
    moved = {k: v + 0.01 for k, v in state.items()}
    third = client_app.train(_request(cfg, moved, node.base.fingerprint), context)
    assert third.content[codec.METRICS]["replayed"] == 0
    assert ledger.summary()[0].rounds == 2 and ledger.summary()[0].epsilon > spend.epsilon


def test_a_release_file_that_does_not_match_its_ledger_entry_is_not_sent(flower_identity, cls_config):
    cfg = cls_config("federation.num_clients=2", "federation.partitioner=iid")
    node = build_node(cfg)
    state = get_adapter_state(node.model)
    context = _context({"partition-id": 1, "num-partitions": 2})
    TaskIdentity.node_id = 2
    client_app.train(_request(cfg, state, node.base.fingerprint), context)
    ledger = Ledger(Path(cfg.output.dir) / "ledgers" / "institution-1.json")
    (kept,) = Releases(ledger.path).folder.glob("*.safetensors")
    kept.write_bytes(kept.read_bytes()[:-4] + b"\0\0\0\0")
    again = client_app.train(_request(cfg, state, node.base.fingerprint), context)
    assert again.content[codec.METRICS]["replayed"] == 0
    assert ledger.summary()[0].rounds == 2


def test_a_run_folder_is_resumed_only_with_the_same_config(cls_config, tmp_path):
    out = tmp_path / "run"
    cfg = cls_config(f"output.dir={out}")
    assert find_checkpoint(out, cfg) is None
    recorder = RunRecorder(cfg, out, "run-1")
    out.mkdir()
    (out / "config.yaml").write_text(to_yaml(cfg))
    recorder.checkpoint(2, codec.state_to_record({"a": torch.ones(3)}))
    found = find_checkpoint(out, cfg)
    assert found.round == 2 and found.run_id == "run-1" and torch.equal(found.adapter["a"], torch.ones(3))
    with pytest.raises(RunFolderError, match=r"different config: train.lr"):
        find_checkpoint(out, cls_config(f"output.dir={out}", "train.lr=0.5"))
    with pytest.raises(RunFolderError, match="output.resume=false"):
        find_checkpoint(out, cls_config(f"output.dir={out}", "output.resume=false"))
    (out / "summary.json").write_text("{}")
    with pytest.raises(RunFolderError, match="finished run"):
        find_checkpoint(out, cfg)


def test_restore_keeps_only_checkpointed_rounds_and_fedadam_moments_survive(flower_identity, cls_config, tmp_path):
    cfg = cls_config("federation.strategy=fedadam", "federation.min_clients=1")
    recorder = RunRecorder(cfg, tmp_path, "r")
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"round": r, "wall_seconds": 10.0 * r, "clients": [], "eval_weighted": {}}) + "\n"
        for r in (1, 2, 3)))
    recorder.restore(2)  # round 3's line was written, its checkpoint was not: it is run again
    assert [r["round"] for r in recorder.rounds] == [1, 2]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    strategy = make_strategy(cfg, recorder)
    strategy.configure_train(1, codec.state_to_record({"a": torch.zeros(3)}), ConfigRecord(), _FakeGrid())
    strategy.aggregate_train(1, [_train_reply(2, {"a": torch.full((3,), 0.01)}, 5, 0)])
    saved = strategy.strategy_state()
    assert set(saved) == {"m_t/a", "v_t/a"}
    other = make_strategy(cfg, RunRecorder(cfg, tmp_path, "r"))
    other.load_strategy_state(saved)
    for name in ("m_t", "v_t"):
        np.testing.assert_array_equal(getattr(other, name)["a"], getattr(strategy, name)["a"])


class _FakeGrid:
    def get_node_ids(self):
        return [2]


def test_the_moving_average_is_of_what_was_published_and_survives_a_resume(flower_identity, cls_config, tmp_path):
    """federation.ema=0.5 over three published adapters a1, a2, a3: institutions evaluate, and the run
    saves, 0.5·(0.5·a1 + 0.5·a2) + 0.5·a3; training goes on from the plain adapter; a resumed strategy
    continues the same average (checkpointed with the server state). Without ema, the plain adapter."""
    cfg = cls_config("federation.ema=0.5", "federation.min_clients=1")
    strategy = make_strategy(cfg, RunRecorder(cfg, tmp_path, "r"))
    published = [{"a": torch.full((3,), v)} for v in (1.0, 3.0, 7.0)]

    def evaluated(strategy, rnd, state):
        (msg,) = strategy.configure_evaluate(rnd, codec.state_to_record(state), ConfigRecord(), _FakeGrid())
        return codec.record_to_state(msg.content[codec.ARRAYS])["a"]

    assert torch.equal(evaluated(strategy, 0, {"a": torch.zeros(3)}), torch.zeros(3))  # round 0: not averaged
    assert torch.allclose(evaluated(strategy, 1, published[0]), torch.full((3,), 1.0))
    assert torch.allclose(evaluated(strategy, 2, published[1]), torch.full((3,), 2.0))
    (sent,) = strategy.configure_train(3, codec.state_to_record(published[1]), ConfigRecord(), _FakeGrid())
    assert torch.equal(codec.record_to_state(sent.content[codec.ARRAYS])["a"], published[1]["a"])
    resumed = make_strategy(cfg, RunRecorder(cfg, tmp_path, "r"))
    resumed.load_strategy_state(strategy.strategy_state())
    for s in (strategy, resumed):
        assert torch.allclose(evaluated(s, 3, published[2]), torch.full((3,), 4.5))
        assert torch.allclose(codec.record_to_state(s.published(codec.state_to_record(published[2])))["a"],
                              torch.full((3,), 4.5))
    out = tmp_path / "finished"  # died after its last round's checkpoint, before its summary: rerun
    done_cfg = cls_config("federation.ema=0.5", "federation.rounds=1", f"output.dir={out}")
    # The run config carries the label set, as a simulation's does: the coordinator holds no data.
    done_cfg.data.labels = load_task_data(done_cfg.data, done_cfg.model.task).labels
    node = build_node(done_cfg)
    plain_state = {k: v + 1.0 for k, v in get_adapter_state(node.model).items()}
    out.mkdir()
    (out / "config.yaml").write_text(to_yaml(done_cfg))
    RunRecorder(done_cfg, out, "run-f").checkpoint(
        1, codec.state_to_record(plain_state), {f"averaged/{k}": v.double() - 0.25 for k, v in plain_state.items()})
    run_server(None, done_cfg, "run-f")  # nothing left to train: no grid is asked
    labels = next(v.shape[0] for k, v in plain_state.items() if "classifier" in k and k.endswith("weight"))
    saved = PeftModel.from_pretrained(load_base(done_cfg.model, labels).model, str(out / "adapter"))
    for key, value in get_adapter_state(saved).items():
        assert torch.allclose(value, plain_state[key] - 0.25), key
    plain = make_strategy(cls_config("federation.min_clients=1"), RunRecorder(cfg, tmp_path, "r"))
    assert torch.equal(evaluated(plain, 1, published[2]), published[2]["a"])
    from fedslm.errors import ConfigError

    with pytest.raises(ConfigError, match="federation.ema"):
        cls_config("federation.ema=1.0")


def test_a_reused_model_in_one_process_trains_exactly_like_a_fresh_one(flower_identity, cls_config, tmp_path):
    """Simulation actors reuse the loaded base across rounds and institutions: institution 1's update
    after institution 0 trained in the same process equals its update in a fresh process."""
    from fedslm.node import institution as node_logic

    cfg = cls_config("federation.num_clients=2", "federation.partitioner=iid")
    node = build_node(cfg)
    state = get_adapter_state(node.model)
    TaskIdentity.node_id = 2

    def train(inst):
        reply = client_app.train(_request(cfg, state, node.base.fingerprint), _context(
            {"partition-id": inst, "num-partitions": 2}))
        assert not reply.has_error(), reply.error
        assert reply.content[codec.METRICS]["replayed"] == 0
        return codec.reply_state(reply)

    node_logic._LOADED.clear()
    train(0)
    reused = train(1)
    node_logic._LOADED.clear()
    ledgers = Path(cfg.output.dir) / "ledgers"
    for kept in ledgers.glob("institution-1.json*"):  # a fresh ledger: the same request is trained again
        shutil.rmtree(kept) if kept.is_dir() else kept.unlink()
    fresh = train(1)
    for key in fresh:
        torch.testing.assert_close(reused[key], fresh[key], rtol=0, atol=0)


def _local_updates(cfg, n=3):
    """n institutions' updates from one global start: same data, different DP noise."""
    from fedslm.train import round_spec, train_round

    start = build_node(cfg)
    initial = get_adapter_state(start.model)
    states, a_mats = [], []
    for i in range(n):
        node = build_node(cfg)
        set_adapter_state(node.model, initial)
        train_round(node.model, node.train, round_spec(cfg), unit=f"d{i}",
                    ledger=Ledger(Path(cfg.output.dir) / f"l{i}.json"), run_id=f"noise-{i}")
        states.append(get_adapter_state(node.model))
        a_mats.append({k.replace(".default.", "."): p.detach().clone()
                       for k, p in node.model.named_parameters() if ".lora_A." in k})
    return start, states, a_mats


def _aggregate(cfg, states, tmp_path):
    replies = [_train_reply(k + 2, {key: v for key, v in s.items()}, 10, k) for k, s in enumerate(states)]
    arrays, _ = make_strategy(cfg, RunRecorder(cfg, tmp_path, "r")).aggregate_train(1, replies)
    return {k: torch.from_numpy(v) for k, v in zip(states[0], arrays.to_numpy_ndarrays())}


@pytest.mark.parametrize("ffa", [True, False], ids=["ffa-lora", "plain-lora"])
def test_ffa_lora_aggregates_the_product_exactly_and_plain_lora_does_not(flower_identity, cls_config, tmp_path, ffa):
    cfg = cls_config(f"lora.ffa={str(ffa).lower()}", "federation.min_clients=3", "train.lr=0.05",
                     "privacy.noise_multiplier=1.0", "privacy.noise_seed=null")
    start, states, a_mats = _local_updates(cfg)
    agg = _aggregate(cfg, states, tmp_path)
    b_keys = sorted(k for k in states[0] if ".lora_B." in k)
    assert b_keys
    gaps = []
    for b_key in b_keys:
        a_key = b_key.replace(".lora_B.", ".lora_A.")
        mean_product = torch.stack([s[b_key] @ a[a_key] for s, a in zip(states, a_mats)]).mean(0)
        a_global = a_mats[0][a_key] if ffa else agg[a_key]
        gap = float((agg[b_key] @ a_global - mean_product).abs().max()) / float(mean_product.abs().max())
        gaps.append(gap)
    if ffa:
        assert not any(".lora_A." in k for k in states[0])  # A never leaves a node
        assert all(torch.equal(a_mats[0][k], a[k]) for a in a_mats for k in a)  # one shared, frozen A
        assert max(gaps) < 1e-5  # the average of B·A is exactly B̄·A
    else:
        assert max(gaps) > 1e-2  # averaging A and B separately is not the average of B·A


def test_ffa_lora_trains_and_ships_half_the_lora_dimensions(cls_config):
    plain = build_node(cls_config())
    ffa = build_node(cls_config("lora.ffa=true"))
    lora_plain = sum(p.numel() for n, p in plain.model.named_parameters() if p.requires_grad and "lora_" in n)
    lora_ffa = sum(p.numel() for n, p in ffa.model.named_parameters() if p.requires_grad and "lora_" in n)
    b_only = sum(p.numel() for n, p in plain.model.named_parameters() if ".lora_B." in n)
    assert lora_ffa == b_only and lora_plain > lora_ffa
    assert codec.tensor_bytes(get_adapter_state(ffa.model)) < codec.tensor_bytes(get_adapter_state(plain.model))
    # Every node draws the same A from train.seed; a different seed is caught by the digest check.
    assert frozen_digest(ffa.model) == frozen_digest(build_node(cls_config("lora.ffa=true")).model) != ""
    assert frozen_digest(build_node(cls_config("lora.ffa=true", "train.seed=5")).model) != frozen_digest(ffa.model)


def _cl_reply(node, arrays):
    return _train_reply(node, {k: torch.from_numpy(v) for k, v in arrays.items()}, 10 * node, node)


def test_client_level_dp_clips_each_update_and_averages_unweighted(flower_identity, cls_config, tmp_path):
    cfg = cls_config("federation.min_clients=3", "federation.num_clients=3", "privacy.client_level.enabled=true",
                     "privacy.client_level.clipping_norm=1.0", "privacy.client_level.noise_multiplier=1e-9",
                     "federation.max_update_norm=100")
    sent = {"a": np.zeros((4, 3), np.float32), "b": np.zeros(5, np.float32)}
    updates = [{"a": np.full((4, 3), 0.1, np.float32), "b": np.full(5, 0.1, np.float32)},   # norm 0.41: kept
               {"a": np.full((4, 3), 1.0, np.float32), "b": np.full(5, -1.0, np.float32)},  # norm 4.12: clipped
               {"a": np.full((4, 3), 0.2, np.float32), "b": np.zeros(5, np.float32)}]       # norm 0.69: kept
    outer, inner = make_strategies(cfg, RunRecorder(cfg, tmp_path, "r"))
    inner.sent = {k: torch.from_numpy(v) for k, v in sent.items()}
    outer.current_arrays = codec.state_to_record(inner.sent)
    # One node sends its keys in the other order: clipping must pair tensors by key, not position.
    replies = [_cl_reply(n + 2, u if n != 1 else dict(reversed(list(u.items())))) for n, u in enumerate(updates)]
    arrays, _ = outer.aggregate_train(1, replies)
    got = dict(zip(["a", "b"], arrays.to_numpy_ndarrays()))
    clipped = []
    for u in updates:  # the reference: scale each update to L2 norm <= 1, then a plain mean (not by size)
        norm = np.sqrt(sum((v ** 2).sum() for v in u.values()))
        clipped.append({k: v * min(1.0, 1.0 / norm) for k, v in u.items()})
    for k in ("a", "b"):
        np.testing.assert_allclose(got[k], np.mean([c[k] for c in clipped], axis=0), rtol=1e-5, atol=1e-6)


def test_client_level_dp_adds_noise_of_std_z_c_over_the_k_replies_averaged_and_screens_first(flower_identity,
                                                                                              cls_config, tmp_path):
    """4 institutions planned, 2 of them rejected: the mean of the 2 left has sensitivity C/2, so the noise
    is z·C/2 (z·C/4, for the planned count, under-noised such rounds)."""
    cfg = cls_config("federation.min_clients=2", "federation.num_clients=4", "privacy.client_level.enabled=true",
                     "privacy.client_level.clipping_norm=0.5", "privacy.client_level.noise_multiplier=2.0")
    sent = {"w": np.zeros(40_000, np.float32)}
    outer, inner = make_strategies(cfg, RunRecorder(cfg, tmp_path, "r"))
    inner.sent = {k: torch.from_numpy(v) for k, v in sent.items()}
    outer.current_arrays = codec.state_to_record(inner.sent)
    bad = {"w": np.full(40_000, np.nan, np.float32)}
    replies = [_cl_reply(2, sent), _cl_reply(3, bad), _cl_reply(4, sent), _cl_reply(5, {"w": np.zeros(3, np.float32)})]
    arrays, _ = outer.aggregate_train(1, replies)
    noise = arrays.to_numpy_ndarrays()[0]
    assert float(noise.std()) == pytest.approx(2.0 * 0.5 / 2, rel=0.03)  # k = 2 updates averaged
    note = inner.recorder.pending[1]["client_level"]
    assert note["institutions_averaged"] == 2 and note["noise_std"] == pytest.approx(0.5)
    reasons = {e["node"]: e["reason"] for e in inner.recorder.pending[1]["errors"]}
    assert "NaN" in reasons[3] and "shape" in reasons[5]


def test_client_level_epsilon_composes_rounds_below_the_classical_rdp_bound(cls_config):
    from fedslm.coordinator.client_level import client_level_summary

    cfg = cls_config("federation.num_clients=5", "privacy.client_level.enabled=true",
                     "privacy.client_level.noise_multiplier=1.5")
    eps = [client_level_summary(cfg, r)["epsilon"] for r in (1, 2, 4)]
    assert 0 < eps[0] < eps[1] < eps[2]
    delta = 1e-5  # the default: far below 1/institutions (1/(10·5) = 0.02 was the old default)
    assert client_level_summary(cfg, 1)["delta"] == delta
    for rounds, e in zip((1, 2, 4), eps):  # RDP of R Gaussian releases: R·α/(2z²), classical conversion
        classical = min(rounds * a / (2 * 1.5 ** 2) + np.log(1 / delta) / (a - 1) for a in np.linspace(1.01, 64, 5000))
        assert e <= classical + 1e-6 and e > 0.5 * classical


def test_float16_transfer_halves_the_bytes_and_the_coordinator_averages_in_float32(flower_identity, cls_config,
                                                                                    tmp_path):
    cfg = cls_config("federation.num_clients=2", "federation.partitioner=iid", "federation.transfer_dtype=float16")
    node = build_node(cfg)
    state = get_adapter_state(node.model)
    recorder = RunRecorder(cfg, tmp_path, "r")
    strategy = make_strategy(cfg, recorder)
    sent = list(strategy.configure_train(1, codec.state_to_record(state), ConfigRecord(
        dict(codec.request_config(to_yaml(cfg), node.base.fingerprint, "run-x"))), _TwoNodeGrid()))
    wire = codec.record_to_state(sent[0].content[codec.ARRAYS])
    assert all(t.dtype == torch.float16 for t in wire.values())  # the global adapter goes down in float16
    replies = []
    for inst in (0, 1):
        msg = _request(cfg, state, node.base.fingerprint, node_id=2 + inst)  # two nodes: one reply each
        msg.content[codec.ARRAYS] = sent[0].content[codec.ARRAYS]
        TaskIdentity.node_id = 2 + inst
        reply = client_app.train(msg, _context({"partition-id": inst, "num-partitions": 2}))
        assert not reply.has_error(), reply.error
        up = codec.reply_state(reply)
        assert all(t.dtype == torch.float16 for t in up.values())
        assert reply.content[codec.METRICS]["bytes-up"] == codec.tensor_bytes(state) // 2
        assert reply.content[codec.METRICS]["bytes-down"] == codec.tensor_bytes(state) // 2
        replies.append(reply)
    TaskIdentity.node_id = 1
    ups = [{k: v.float() for k, v in codec.reply_state(r).items()} for r in replies]
    weights = [r.content[codec.METRICS]["num-examples"] for r in replies]
    recorder.sent = []
    arrays, _ = strategy.aggregate_train(1, replies)
    got = codec.record_to_state(arrays)
    for key, value in got.items():
        assert value.dtype == torch.float32
        ref = (ups[0][key] * weights[0] + ups[1][key] * weights[1]) / sum(weights)
        torch.testing.assert_close(value, ref, rtol=1e-6, atol=1e-7)


class _TwoNodeGrid:
    def get_node_ids(self):
        return [2, 3]


def test_a_simulation_joins_a_ray_cluster_when_given_its_address(cls_config, tmp_path):
    import tomllib

    from fedslm.simulation.simulate import ray_env, write_flower_config

    write_flower_config(tmp_path / "local", 9999, cls_config("federation.client_cpus=1"))
    write_flower_config(tmp_path / "cluster", 9999, cls_config("federation.ray_address=auto",
                                                               "federation.client_cpus=2"))
    local = tomllib.loads((tmp_path / "local" / "config.toml").read_text())["superlink"]["fedslm"]
    cluster = tomllib.loads((tmp_path / "cluster" / "config.toml").read_text())["superlink"]["fedslm"]
    assert "address" not in local["options"]["backend"]["init-args"]
    assert local["options"]["backend"]["init-args"]["num-cpus"] >= 1
    # On a cluster, Ray counts every machine's CPUs itself (ray.init refuses num_cpus with an address), and
    # Flower's ray.init() finds the cluster through RAY_ADDRESS (tests/test_ray_cluster.py runs one).
    assert "num-cpus" not in cluster["options"]["backend"]["init-args"]
    assert ray_env(cls_config("federation.ray_address=auto")) == {"RAY_ADDRESS": "auto"}
    assert ray_env(cls_config()) == {}
    assert cluster["options"]["backend"]["client-resources"]["num-cpus"] == 2


def test_the_coordinator_takes_the_label_set_from_the_run_config_and_the_simulation_fills_it(cls_config):
    """The coordinator holds no data (issue 31): without data.labels it refuses rather than read the file;
    the simulation driver puts the scenario's label set into the run config before the ServerApp starts."""
    from fedslm.coordinator.server import label_set
    from fedslm.errors import ConfigError
    from fedslm.simulation.simulate import check_data

    cfg = cls_config()
    assert cfg.data.labels is None
    with pytest.raises(ConfigError, match="data.labels must list the label set"):
        label_set(cfg)
    check_data(cfg)
    assert cfg.data.labels == load_task_data(cfg.data, cfg.model.task).labels and len(cfg.data.labels) >= 2
    assert label_set(cfg) == cfg.data.labels
