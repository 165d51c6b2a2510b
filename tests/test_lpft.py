"""LP-FT (fedslm.train.lpft): probe rounds train the head alone, LoRA joins at lora.from_round, the node
refuses a probe round whose LoRA has moved, and FedAdam steps LoRA at federation.lora_server_lr."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MessageType, RecordDict, Message
from flwr.supercore.task_identity import TaskIdentity

import fedslm.node.app as client_app
from fedslm.config import to_yaml
from fedslm.coordinator.server import RunRecorder, make_strategy
from fedslm.errors import ConfigError
from fedslm.lora import get_adapter_state, trainable_parameters
from fedslm.lora.adapter import frozen_digest
from fedslm.privacy import Ledger
from fedslm.train import build_node, lpft
from fedslm.wire import codec
from fedslm.wire.errors import public_reason

LPFT = ("lora.layers=1", "lora.from_round=2", "federation.rounds=3", "train.full_batch=true", "train.local_steps=1",
        "train.optimizer=sgd", "train.lr=1.0", "federation.num_clients=2", "federation.partitioner=iid")


@pytest.mark.parametrize("overrides, key", [
    (("lora.from_round=2", "lora.layers=0", "federation.rounds=3"), "lora.layers >= 1"),
    (("lora.from_round=2", "federation.rounds=3"), "lora.layers >= 1"),  # unset: the whole model, no cache
    (("lora.from_round=4", "lora.layers=1", "federation.rounds=3"), "past federation.rounds"),
    (("lora.from_round=1", "lora.layers=1"), "lora.from_round must be"),
    (("lora.from_round=2", "lora.layers=1", "federation.rounds=3", "federation.strategy=fedprox"), "fedprox"),
    (("lora.from_round=2", "lora.layers=1", "federation.rounds=3", "privacy.client_level.enabled=true"),
     "privacy.client_level"),
    (("lora.from_round=2", "lora.layers=1", "federation.rounds=3", "federation.secure_aggregation=true"),
     "federation.secure_aggregation"),
    (("lora.train_head=false", "lora.layers=1"), "lora.train_head"),
    (("federation.lora_server_lr=0.01", "lora.layers=1"), "fedadam"),
    (("federation.lora_server_lr=0.01", "lora.layers=0", "federation.strategy=fedadam"), "lora.layers=0"),
    (("federation.lora_server_lr=0", "federation.strategy=fedadam"), "federation.lora_server_lr must be > 0"),
])
def test_lp_ft_settings_that_no_run_could_use_are_refused_naming_the_key(cls_config, overrides, key):
    with pytest.raises(ConfigError, match=key):
        cls_config(*overrides)


def test_rounds_before_from_round_are_probe_rounds_on_sentence_vectors():
    assert [lpft.round_layers(2, 3, r) for r in (1, 2, 3, 4)] == [0, 0, 2, 2]
    assert [lpft.round_layers(2, None, r) for r in (1, 2)] == [2, 2]
    assert [lpft.freezes_head(False, 3, r) for r in (1, 2, 3)] == [False, False, True]
    assert not lpft.freezes_head(True, 3, 3)


def test_a_probe_round_with_a_moved_lora_b_is_refused():
    lpft.check_probe_adapter({"x.lora_A.weight": torch.ones(2, 2), "x.lora_B.weight": torch.zeros(2, 2)}, 1)
    with pytest.raises(lpft.ProbeAdapterError, match="lora_B"):
        lpft.check_probe_adapter({"x.lora_B.weight": torch.tensor([[0.0, 1e-9]])}, 1)


def test_a_frozen_head_keeps_the_adapter_keys_and_trains_again_after_even_an_error(cls_config):
    from fedslm.lora.adapter import _INDEX

    node = build_node(cls_config("lora.layers=1"))
    keys = set(get_adapter_state(node.model))
    object.__setattr__(node.model, _INDEX, None)  # the adapter's key index built while the head is frozen
    with pytest.raises(RuntimeError, match="mid-round"):
        with lpft.head_frozen(node.model, True):
            assert not any("classifier" in n for n in trainable_parameters(node.model))
            assert set(get_adapter_state(node.model)) == keys  # the head still travels, unchanged
            raise RuntimeError("mid-round")
    assert any("classifier" in n for n in trainable_parameters(node.model))
    assert set(get_adapter_state(node.model)) == keys


def _train(cfg, state, fingerprint, server_round, frozen=""):
    TaskIdentity.node_id = 1
    content = RecordDict({
        codec.ARRAYS: codec.state_to_record(state),
        codec.CONFIG: ConfigRecord({**codec.request_config(to_yaml(cfg), fingerprint, "run-lpft", frozen),
                                    "server-round": server_round}),
    })
    TaskIdentity.node_id = 2
    return client_app.train(Message(content, dst_node_id=2, message_type=MessageType.TRAIN),
                            client_app_context())


def client_app_context():
    from flwr.app import Context

    return Context(run_id=1, node_id=2, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                   run_config={})


def _moved(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("train_head", [True, False])
def test_a_node_trains_the_head_alone_before_from_round_and_lora_from_it(flower_identity, cls_config, train_head):
    cfg = cls_config(*LPFT, f"lora.train_head={str(train_head).lower()}")
    node = build_node(cfg)
    start = get_adapter_state(node.model)
    probe = _train(cfg, start, node.base.fingerprint, 1)
    assert not probe.has_error(), probe.error
    after_probe = codec.record_to_state(probe.content[codec.ARRAYS])
    # The head (weight and bias: lora.head_bias is on here) moved; LoRA came back as sent, un-noised.
    assert _moved(start, after_probe) == {k for k in start if "classifier" in k} != set()
    tuned = _train(cfg, after_probe, node.base.fingerprint, 2)
    assert not tuned.has_error(), tuned.error
    after = codec.record_to_state(tuned.content[codec.ARRAYS])
    moved = _moved(after_probe, after)
    assert any("lora_B" in k for k in moved)
    assert any("classifier" in k for k in moved) == train_head
    # Each round is charged the plan's step, probe or not: the same (σ, q, steps) as a run without LP-FT plans.
    path = Path(cfg.output.dir) / "ledgers" / "institution-0.json"
    charged = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in Ledger(path).entries(cfg.privacy.unit)]
    from fedslm.train.local import privacy_plan, round_spec

    n = json.loads(path.read_text())["units"][cfg.privacy.unit]["num_examples"]
    planned = privacy_plan(round_spec(cls_config(*[o for o in LPFT if not o.startswith("lora.from_round")])), n)
    assert charged == [(planned.noise_multiplier, 1.0, 1)] * 2
    e1, e2 = probe.content[codec.METRICS]["epsilon"], tuned.content[codec.METRICS]["epsilon"]
    assert 0 < e1 < e2 <= cfg.privacy.target_epsilon


def test_a_probe_round_is_make_runs_head_round_bit_for_bit(flower_identity, cls_config, tmp_path):
    """The same noise seed, round and records: the head a probe round releases is the one a node training the
    head alone (lora.layers=0) releases."""
    cfg = cls_config(*LPFT)
    node = build_node(cfg)
    probe = codec.record_to_state(_train(cfg, get_adapter_state(node.model), node.base.fingerprint, 1)
                                  .content[codec.ARRAYS])
    head_cfg = cls_config(*[o for o in LPFT if not o.startswith(("lora.layers", "lora.from_round"))], "lora.layers=0",
                          f"output.dir={tmp_path / 'head-only'}")
    head_node = build_node(head_cfg)
    alone = codec.record_to_state(_train(head_cfg, get_adapter_state(head_node.model), head_node.base.fingerprint, 1,
                                         frozen_digest(head_node.model)).content[codec.ARRAYS])
    heads = sorted(k for k in probe if "classifier" in k)
    assert heads and heads == sorted(alone)
    for k in heads:
        assert torch.equal(probe[k], alone[k]), k


def test_a_node_refuses_a_probe_round_whose_lora_has_moved_before_charging(flower_identity, cls_config):
    cfg = cls_config(*LPFT)
    node = build_node(cfg)
    state = get_adapter_state(node.model)
    b = next(k for k in state if "lora_B" in k)
    state[b] = state[b] + 0.01
    reply = _train(cfg, state, node.base.fingerprint, 1)
    assert reply.has_error() and reply.error.reason == public_reason("bad-request")
    ledger = Path(cfg.output.dir) / "ledgers" / "institution-0.json"  # where a simulated node 0 charges
    assert not ledger.exists() or Ledger(ledger).entries(cfg.privacy.unit) == []
    state[b] = torch.zeros_like(state[b])  # the same request with LoRA at its start is served and charged
    assert not _train(cfg, state, node.base.fingerprint, 1).has_error()
    assert len(Ledger(ledger).entries(cfg.privacy.unit)) == 1


def test_a_probe_round_without_cached_sentence_vectors_is_refused_before_charging(flower_identity, cls_config,
                                                                                  monkeypatch):
    cfg = cls_config(*LPFT)
    node = build_node(cfg)
    monkeypatch.setenv("FEDSLM_CACHE_MAX_BYTES", "1")  # no split is cached: the whole model would train
    reply = _train(cfg, get_adapter_state(node.model), node.base.fingerprint, 1)
    assert reply.has_error() and reply.error.reason == public_reason("refused-by-policy")
    ledger = Path(cfg.output.dir) / "ledgers" / "institution-0.json"
    assert not ledger.exists() or Ledger(ledger).entries(cfg.privacy.unit) == []


def _reply(node_id, state, n):
    from tests.test_federation import _train_reply

    return _train_reply(node_id, state, n, node_id - 2)


def test_fedadam_steps_lora_at_lora_server_lr_and_the_head_at_server_lr(flower_identity, cls_config, tmp_path):
    """Against Adam written out (Flower's FedAdam: β = (0.9, 0.99), τ = 1e-3, bias-corrected) with η per tensor."""
    cfg = cls_config("lora.layers=1", "federation.strategy=fedadam", "federation.server_lr=0.3",
                     "federation.lora_server_lr=0.003", "federation.min_clients=2")
    node = build_node(cfg)
    glob = {k: v.double() for k, v in get_adapter_state(node.model).items()}
    strategy = make_strategy(cfg, RunRecorder(cfg, tmp_path, "r"))
    gen = torch.Generator().manual_seed(0)
    m = {k: torch.zeros_like(v) for k, v in glob.items()}
    v = {k: torch.zeros_like(t) for k, t in glob.items()}
    for rnd in (1, 2):
        # What configure_train leaves behind: the adapter sent (ours) and Flower's copy of it.
        strategy.sent = {k: t.float() for k, t in glob.items()}
        strategy.current_arrays = {k: t.float().numpy() for k, t in glob.items()}
        states = [{k: (t + torch.randn(t.shape, generator=gen, dtype=torch.float64) * 0.01).float()
                   for k, t in glob.items()} for _ in range(2)]
        out, _ = strategy.aggregate_train(rnd, [_reply(2 + i, s, 10) for i, s in enumerate(states)])
        got = {k: torch.from_numpy(np.asarray(a.numpy(), dtype=np.float64)) for k, a in out.items()}
        for k in glob:
            d = sum(s[k].double() for s in states) / 2 - glob[k]
            m[k] = 0.9 * m[k] + 0.1 * d
            v[k] = 0.99 * v[k] + 0.01 * d * d
            lr = 0.003 if "lora_" in k else 0.3
            glob[k] = glob[k] + lr * np.sqrt(1 - 0.99 ** (rnd + 1)) / (1 - 0.9 ** (rnd + 1)) * m[k] / (v[k].sqrt() + 1e-3)
            assert torch.allclose(got[k], glob[k], atol=1e-5), k
        glob = got
    assert any("lora_" in k for k in glob) and any("classifier" in k for k in glob)
