"""A hostile coordinator against a node's availability: the budget holds, the machine must too.

Each test is one attack of issue 29 that made a node work, allocate or wait without bound (or read its
record count off refusals); the node must refuse it first, or bound it. A test that would hang on code
without the defence fails fast instead: a spy raises where the unbounded work would start, or the call
runs under an alarm.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import fedslm.node.app as client_app
from fedslm.privacy import Ledger, epsilon
from fedslm.wire import codec

from test_hostile_coordinator import CAP, _ledger, _ok, _refused, _send, _yaml, coordinator, hospital  # noqa: F401


def _resources(context: Context, **values) -> Context:
    """The node's policy with ``values`` under resources."""
    path = Path(context.node_config["policy"])
    policy = yaml.safe_load(path.read_text())
    policy.setdefault("resources", {}).update(values)
    path.write_text(yaml.safe_dump(policy))
    return context


@contextlib.contextmanager
def _within(seconds: int):
    """Fail, rather than hang, if the block runs longer than ``seconds`` (a bound on a hang, not a speed test)."""
    def stop(signum, frame):  # noqa: ARG001
        raise TimeoutError(f"still running after {seconds} s: the node would be pinned")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _never(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"the node {what}")
    return fail


# ------------------------------------------------------------------ work: rounds, steps, rank, memory, time


def test_a_billion_rounds_are_refused_before_the_noise_plan(flower_identity, coordinator, hospital, tmp_path,
                                                           monkeypatch):
    """federation.rounds=10**9 made the plan evaluate the accountant once per planned round before anything
    was charged. Refused as refused-by-policy before any planning or any record is read."""
    import fedslm.node.serve as serve
    import fedslm.train.local as local

    monkeypatch.setattr(local, "plan", _never("planned a request past its resources.max_rounds_per_run"))
    monkeypatch.setattr(serve, "institution_task_data", _never("read its records for a request it must refuse"))
    cfg, state, fp = coordinator
    for rounds in (10**9, 1001):
        _refused(_send(hospital(), _yaml(cfg, federation__rounds=rounds), state, fingerprint=fp), "refused-by-policy")
    assert not _ledger(tmp_path).path.exists()


def test_planning_cost_does_not_grow_with_the_requested_rounds(flower_identity, coordinator, hospital, monkeypatch):
    """At the cap (1000 rounds) the node plans and serves the round with the noise search's ε conversions
    (a few dozen, whatever the rounds), none per planned round."""
    from opacus.accountants.analysis import rdp

    calls = []
    real = rdp.get_privacy_spent

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 200:
            raise AssertionError("the plan converts ε once per planned round")
        return real(*args, **kwargs)

    monkeypatch.setattr(rdp, "get_privacy_spent", counted)
    cfg, state, fp = coordinator
    _ok(_send(hospital(), _yaml(cfg, federation__rounds=1000), state, fingerprint=fp))
    assert len(calls) <= 100, len(calls)


def test_local_steps_past_the_cap_are_refused_before_training(flower_identity, coordinator, hospital, tmp_path,
                                                               monkeypatch):
    """train.local_steps=10**8 at a tiny ε passed the plan, and the node trained for days."""
    import fedslm.node.serve as serve

    monkeypatch.setattr(serve, "train_round", _never("trained a request past its resources.max_local_steps"))
    cfg, state, fp = coordinator
    text = _yaml(cfg, train__local_steps=10**8, privacy__target_epsilon=1e-3)
    _refused(_send(hospital(), text, state, fingerprint=fp), "refused-by-policy")
    node = _resources(hospital(), max_local_steps=2)
    _refused(_send(node, _yaml(cfg), state, fingerprint=fp), "refused-by-policy")  # 3 steps > 2
    assert not _ledger(tmp_path).path.exists()


def test_a_round_past_its_wall_time_is_ended_charged_and_nothing_is_released(flower_identity, coordinator, hospital,
                                                                            tmp_path):
    """A round that runs past resources.max_seconds_per_round ends after the step that passed it: no update
    leaves, and its reservation (every planned step, written before training) stands."""
    from fedslm.node.releases import Releases

    cfg, state, fp = coordinator
    node = _resources(hospital(), max_seconds_per_round=1e-9)
    _refused(_send(node, _yaml(cfg), state, fingerprint=fp), "refused-by-policy")
    (entry,) = _ledger(tmp_path).entries("all-records")
    assert entry["steps"] == cfg.train.local_steps and "release" not in entry
    folder = Releases(_ledger(tmp_path).path).folder
    assert not folder.exists() or not any(folder.iterdir())


def test_a_huge_lora_rank_is_refused_before_the_base_or_adapter_is_loaded(flower_identity, coordinator, hospital,
                                                                           tmp_path, monkeypatch):
    """lora.r=10**6 allocated until the process died."""
    import fedslm.node.institution as institution

    monkeypatch.setattr(institution, "load_base", _never("loaded a model for a request past resources.max_lora_rank"))
    monkeypatch.setattr(institution, "wrap", _never("allocated an adapter past resources.max_lora_rank"))
    institution._LOADED.clear()
    cfg, state, fp = coordinator
    for rank in (10**6, 65):
        _refused(_send(hospital(), _yaml(cfg, lora__r=rank), state, fingerprint=fp), "refused-by-policy")
    assert not _ledger(tmp_path).path.exists()


@pytest.mark.parametrize("edits,resources", [
    # the adapter and its per-record gradients: lora.r=64 is within max_lora_rank, not within this memory
    ({"lora__r": 64}, {"max_memory_gb": 7e-4}),
    # 10**10 record indices drawn up front, at the default 16 GiB
    ({"train__local_steps": 10000, "train__batch_size": 10**6}, {}),
    # a physical batch's activations
    ({"train__physical_batch_size": 128, "model__max_length": 64}, {"max_memory_gb": 7e-4}),
], ids=["rank", "batch-indices", "activations"])
def test_a_round_whose_memory_estimate_passes_the_cap_is_refused_before_the_adapter_is_allocated(
        flower_identity, coordinator, hospital, tmp_path, monkeypatch, edits, resources):
    import fedslm.node.institution as institution

    real_wrap = institution.wrap
    monkeypatch.setattr(institution, "wrap", _never("allocated an adapter past resources.max_memory_gb"))
    institution._LOADED.clear()
    cfg, state, fp = coordinator
    node = _resources(hospital(), max_length=64, **resources)
    _refused(_send(node, _yaml(cfg, **edits), state, fingerprint=fp), "refused-by-policy")
    assert not _ledger(tmp_path).path.exists()
    if "lora__r" in edits:  # the same budget serves the coordinator's own rank (lora.r=2)
        monkeypatch.setattr(institution, "wrap", real_wrap)
        _ok(_send(node, _yaml(cfg), state, fingerprint=fp))


@pytest.mark.parametrize("rank,layers", [(2, None), (16, None), (8, 1)])
def test_the_memory_estimate_counts_the_adapter_the_model_really_trains(coordinator, tiny_bert_dir, rank, layers):
    """The estimate's adapter (4 copies of 4 bytes a parameter: weights, gradient, two Adam moments) is the
    wrapped model's trainable parameter count, read from the base before the adapter exists."""
    import dataclasses

    from fedslm.lora import wrap
    from fedslm.models import load_base
    from fedslm.node.plan import NodeContext, plan_round, round_memory
    from fedslm.node.policy import NodePolicy, PolicyData, PolicyModels, PolicyPrivacy

    cfg = coordinator[0]
    policy = NodePolicy(data=PolicyData(source="x.csv", labels=["cardio", "ortho", "resp"]),
                        privacy=PolicyPrivacy(ledger="l.json", max_epsilon=2.0, max_delta=1e-4),
                        models=PolicyModels(allowed=[str(tiny_bert_dir)]))
    plan = plan_round(cfg, NodeContext(institution=0, num_institutions=0, policy=policy))
    base = load_base(plan.model, 3)
    plan = dataclasses.replace(plan, lora=dataclasses.replace(plan.lora, r=rank, layers=layers,
                                                               target_modules=list(base.target_modules)))
    estimate = round_memory(plan, base.model, 3)
    model = wrap(base.model, plan.lora, plan.model.task, base.target_modules, seed=0)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate["adapter"] == pytest.approx(16 * trained, rel=0.05)
    assert estimate["per-record gradients"] == pytest.approx(4 * trained * plan.spec.physical_batch_size, rel=0.05)


def test_prv_planning_at_the_caps_never_builds_an_unbounded_grid(monkeypatch):
    """1000 rounds of 10,000 local steps with the PRV accountant needed a grid of ~2·10**9 points while planning
    (the process died); past PRV's bounds σ is planned with RDP, a looser upper bound."""
    from opacus.accountants import prv

    from fedslm.privacy import plan

    real = prv.PRVAccountant._get_domain

    def bounded(self, *args, **kwargs):
        domain = real(self, *args, **kwargs)
        assert domain.size <= 2_000_000, f"a PRV grid of {domain.size} points"  # ~340 MB
        return domain

    monkeypatch.setattr(prv.PRVAccountant, "_get_domain", bounded)
    plan.cache_clear()
    pl = plan(num_examples=1000, batch_size=10, local_steps=10000, rounds=1000, target_epsilon=2.0, delta=1e-5,
              accountant="prv")
    assert pl.epsilon <= 2.0 + 1e-9 and pl.noise_multiplier > 0
    small = plan(num_examples=1000, batch_size=10, local_steps=10, rounds=3, target_epsilon=2.0, delta=1e-5,
                 accountant="prv")
    assert small.epsilon == pytest.approx(epsilon([(small.noise_multiplier, 0.01, 30)], 1e-5, "prv"))


# ------------------------------------------------------------------ the ledger: a new σ every round


def _counting_rdp(monkeypatch) -> list:
    from opacus.accountants.analysis import rdp

    calls = []
    real = rdp._compute_rdp

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rdp, "_compute_rdp", counted)
    return calls


def test_a_new_sigma_every_round_does_not_make_the_ledgers_check_slower(tmp_path, monkeypatch):
    """A coordinator asking for a fresh σ each round defeated the merge of identical rounds: every check
    composed the whole ledger again. With the running RDP sum a round's check costs the same at the 12th
    round as at the 4th, and ε is the full composition's."""
    calls = _counting_rdp(monkeypatch)
    ledger = Ledger(tmp_path / "l.json")
    history, cost = [], {}
    for r in range(1, 13):
        step = (1.0 + r / 100, 0.02, 10)
        calls.clear()
        ledger.reserve("u", step, delta=1e-5, max_epsilon=50.0, num_examples=500, run="x", round=r)
        cost[r] = len(calls)
        history.append(step)
    assert cost[12] == cost[4], cost
    assert ledger.spent("u", 1e-5) == pytest.approx(epsilon(history, 1e-5), rel=1e-9)
    # The running sum is derived data: gone (an earlier fedslm's ledger), it is rebuilt from the entries.
    data = json.loads(ledger.path.read_text())
    del data["units"]["u"]["rdp_running"]
    ledger.path.write_text(json.dumps(data))
    assert ledger.spent("u", 1e-5) == pytest.approx(epsilon(history, 1e-5), rel=1e-9)
    # An entry edited by hand after the sum was written (an operator's mistake, a restored backup of the
    # entries alone): the sum no longer matches what it covers and is not trusted.
    ledger.reserve("u", (1.5, 0.02, 10), delta=1e-5, max_epsilon=50.0, num_examples=500, run="x", round=13)
    history.append((1.5, 0.02, 10))
    data = json.loads(ledger.path.read_text())
    data["units"]["u"]["entries"][0]["noise_multiplier"] = 0.6  # less noise: more ε than the sum says
    ledger.path.write_text(json.dumps(data))
    history[0] = (0.6, 0.02, 10)
    assert ledger.spent("u", 1e-5) == pytest.approx(epsilon(history, 1e-5), rel=1e-9)


def test_a_new_sigma_every_round_under_prv_composes_within_bounds(tmp_path, monkeypatch):
    """PRV holds one grid per distinct (σ, q): past MAX_PRV_MECHANISMS of them the unit is composed with RDP
    (an upper bound of the same rounds), so a check never discretises more than that many."""
    from opacus.accountants import prv

    bound = 8  # fedslm.privacy.accountant.MAX_PRV_MECHANISMS
    entries = [{"noise_multiplier": 1.0 + r / 50, "sample_rate": 0.05, "steps": 5, "delta": 1e-5,
                "accountant": "prv", "run": "x", "round": r} for r in range(4 * bound)]
    ledger = Ledger(tmp_path / "l.json")
    ledger.path.write_text(json.dumps({"format": "fedslm-privacy-ledger/2",
                                       "units": {"u": {"num_examples": 200, "entries": entries}}}))
    discretised = []
    real = prv.discretize
    monkeypatch.setattr(prv, "discretize", lambda *a, **kw: discretised.append(1) or real(*a, **kw))
    ledger.reserve("u", (3.0, 0.05, 5), delta=1e-5, max_epsilon=100.0, num_examples=200, round=99, accountant="prv")
    assert len(discretised) <= 2 * bound
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in ledger.entries("u")]
    assert ledger.spent("u", 1e-5, "prv") == pytest.approx(epsilon(history, 1e-5, "rdp"))  # RDP's bound past PRV's
    assert ledger.summary()[0].accountant == "rdp (past prv's bounds)"  # `fedslm ledger show` says which


# ------------------------------------------------------------------ the payload, checked before it is decoded


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _message(cfg, state, fp, arrays: ArrayRecord) -> Message:
    TaskIdentity.node_id = 1
    msg = Message(RecordDict({
        codec.ARRAYS: arrays,
        codec.CONFIG: ConfigRecord({**codec.request_config(_yaml(cfg), fp, "run-h"), "server-round": 1}),
    }), dst_node_id=2, message_type=MessageType.TRAIN)
    TaskIdentity.node_id = 2
    return msg


@pytest.mark.parametrize("attack", ["unknown-key", "wrong-shape", "bytes-disagree-with-metadata"])
def test_an_adapter_that_is_not_the_models_is_refused_before_any_tensor_is_decoded(flower_identity, coordinator,
                                                                                   hospital, tmp_path, monkeypatch,
                                                                                   attack):
    """A payload with a large tensor under a key the model does not have was decoded (and held) before it was
    refused. The keys, dtypes and shapes are checked against the node's own model from the record's metadata
    and each array's .npy header; nothing is materialised before they match."""
    cfg, state, fp = coordinator
    record = codec.state_to_record(state)
    key = sorted(state)[0]
    big = np.zeros(1_000_000, dtype=np.float32)  # 4 MB here; 400 MB in the attack
    if attack == "unknown-key":
        record["base_model.model.evil.weight"] = Array(big)
    elif attack == "wrong-shape":
        record[key] = Array(big)
    else:  # the metadata say the model's shape, the bytes hold a million values
        record[key] = Array(dtype="float32", shape=tuple(state[key].shape), stype="numpy.ndarray", data=_npy(big))
    decoded = []
    real = Array.numpy
    monkeypatch.setattr(Array, "numpy", lambda self: decoded.append(tuple(self.shape)) or real(self))
    reply = client_app.train(_message(cfg, state, fp, record), hospital())
    _refused(reply, "bad-request")
    assert decoded == []
    assert not _ledger(tmp_path).path.exists()


def test_the_models_own_adapter_is_decoded_once_it_matches(coordinator, monkeypatch):
    state = coordinator[1]
    decoded = []
    real = Array.numpy
    monkeypatch.setattr(Array, "numpy", lambda self: decoded.append(tuple(self.shape)) or real(self))
    out = codec.decode_adapter(codec.state_to_record(state), {k: tuple(v.shape) for k, v in state.items()})
    assert sorted(decoded) == sorted(tuple(v.shape) for v in state.values())
    assert all((out[k] == state[k]).all() for k in state)


# ------------------------------------------------------------------ the record count, read from refusals


def test_a_search_over_batch_sizes_learns_nothing_finer_than_the_floor(flower_identity, coordinator, node_policy,
                                                                       class_csv, tmp_path):
    """With the default policy (size private, no data.size_floor) a batch larger than the records was refused
    and a smaller one served: a search over batch sizes read the exact count without spending ε. Two nodes
    of 108 and 72 training records now answer every batch size alike: served up to 64 (the largest power of
    two at or below both counts), refused above. (Served past the budget reads "budget-exhausted", which the
    node checks after the batch: the two answers a prober tells apart.)"""
    cfg, state, fp = coordinator
    smaller = tmp_path / "smaller.csv"
    smaller.write_text("\n".join(class_csv.read_text().splitlines()[:81]) + "\n")
    probes = (64, 65, 72, 108)
    answers = {}
    for data, name in ((class_csv, "a"), (smaller, "b")):
        path = node_policy(cfg, data=data, name=name, ledger=tmp_path / f"{name}.ledger.json", max_epsilon=CAP)
        node = Context(run_id=1, node_id=2, node_config={"policy": str(path)}, state=RecordDict(), run_config={})
        _ok(_send(node, _yaml(cfg), state, fingerprint=fp))  # spends the budget: later probes train nothing
        seen = []
        for i, b in enumerate(probes, start=2):
            reply = _send(node, _yaml(cfg, train__batch_size=b), state, fingerprint=fp, server_round=i)
            served = not reply.has_error() or reply.error.reason == codec_reason("budget-exhausted")
            seen.append(served)
        answers[name] = seen
    assert answers["a"] == answers["b"] == [b <= 64 for b in probes], answers


def codec_reason(category: str) -> str:
    from fedslm.wire.errors import public_reason

    return public_reason(category)


# ------------------------------------------------------------------ the ledger: malformed and non-finite entries


@pytest.mark.parametrize("field,value", [("noise_multiplier", math.nan), ("noise_multiplier", math.inf),
                                         ("sample_rate", math.nan), ("steps", math.inf), ("delta", math.nan)])
def test_a_non_finite_ledger_entry_never_hangs_the_node(flower_identity, coordinator, hospital, tmp_path, field,
                                                        value):
    """NaN σ in the ledger pinned the node (and NaN q read as ε = 0): it is refused, naming the entry."""
    cfg, state, fp = coordinator
    entry = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, "delta": 1e-4, "run": "r", "round": 1}
    entry[field] = value
    _ledger(tmp_path).path.write_text(json.dumps({"format": "fedslm-privacy-ledger/2", "units": {
        "all-records": {"num_examples": 108, "entries": [entry]}}}))
    with _within(60):
        _refused(_send(hospital(), _yaml(cfg), state, fingerprint=fp), "node-misconfigured")
