"""LP-FT (fedslm.train.lpft): probe rounds train the head alone, LoRA joins at lora.from_round, the node
refuses a probe round whose LoRA has moved, and FedAdam steps LoRA at federation.lora_server_lr."""

from __future__ import annotations

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
    (("lora.from_round=0", "lora.layers=1"), "lora.from_round must be"),
    (("lora.from_round=2", "lora.layers=1", "federation.rounds=3", "federation.strategy=fedprox"), "fedprox"),
    (("lora.train_head=false", "lora.layers=0"), "lora.train_head"),
    (("federation.lora_server_lr=0.01",), "fedadam"),
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


def test_a_frozen_head_keeps_the_adapter_keys_and_trains_again_after(cls_config):
    node = build_node(cls_config("lora.layers=1"))
    keys = set(get_adapter_state(node.model))
    with lpft.head_frozen(node.model, True):
        assert not any("classifier" in n for n in trainable_parameters(node.model))
        assert set(get_adapter_state(node.model)) == keys  # the head still travels, unchanged
    assert any("classifier" in n for n in trainable_parameters(node.model))


def _train(cfg, state, fingerprint, server_round):
    TaskIdentity.node_id = 1
    content = RecordDict({
        codec.ARRAYS: codec.state_to_record(state),
        codec.CONFIG: ConfigRecord({**codec.request_config(to_yaml(cfg), fingerprint, "run-lpft"),
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
    assert _moved(start, after_probe) == {k for k in start if "classifier" in k and "bias" not in k} or \
        _moved(start, after_probe) == {k for k in start if "classifier" in k}
    assert not any("lora_" in k for k in _moved(start, after_probe))  # LoRA untouched, un-noised
    tuned = _train(cfg, after_probe, node.base.fingerprint, 2)
    assert not tuned.has_error(), tuned.error
    after = codec.record_to_state(tuned.content[codec.ARRAYS])
    moved = _moved(after_probe, after)
    assert any("lora_B" in k for k in moved)
    assert any("classifier" in k for k in moved) == train_head
    # Each round is charged the plan's one step, probe or not: ε grows and stays within the target.
    e1, e2 = probe.content[codec.METRICS]["epsilon"], tuned.content[codec.METRICS]["epsilon"]
    assert 0 < e1 < e2 <= cfg.privacy.target_epsilon


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
