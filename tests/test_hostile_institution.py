"""A hostile institution against the coordinator, through the Recording strategy with hand-built replies.

Each test is one class of attack a member can mount with what it controls: its reply's metrics
(weights, counts, keys, labels, scores) and its update. The coordinator must decide weights and
identity itself, drop a malformed reply (logged with its node) and never the run, and offer robust
aggregation that a norm-bounded update aimed at a target cannot steer. Robust rules are checked
against slow, obviously correct references (np.median, a sorted trimmed mean, Krum by brute force).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedslm.coordinator.metrics import Labels, lower_median, weights
from fedslm.coordinator.server import RunRecorder, make_strategies, make_strategy, summarize
from fedslm.errors import ConfigError
from fedslm.wire import codec

HONEST = 4  # honest institutions of 1000 records each, nodes 2..5


def _request_to(node_id: int, mtype: str) -> Message:
    TaskIdentity.node_id = 1
    req = Message(RecordDict({codec.CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=node_id,
                  message_type=mtype)
    TaskIdentity.node_id = node_id  # the reply comes from that node (the SuperLink authenticates it)
    return req


def _train(node: int, update, **metrics) -> Message:
    m = {"num-examples": 1000, "unit-weight": 1, "institution": node - 2, "train-loss": 1.0, "epsilon": 1.0,
         "delta": 1e-5, "bytes-up": 1, "bytes-down": 1, "steps": 3, "private": 1, "replayed": 0, **metrics}
    arrays = codec.state_to_record({k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in update.items()})
    return Message(RecordDict({codec.ARRAYS: arrays, codec.METRICS: MetricRecord(m)}),
                   reply_to=_request_to(node, MessageType.TRAIN))


def _evaluate(node: int, **metrics) -> Message:
    m = {"num-examples": 100, "unit-weight": 1, "institution": node - 2, "loss": 1.0, "accuracy": 0.5,
         "macro-f1": 0.4, **metrics}
    return Message(RecordDict({codec.METRICS: MetricRecord(m)}), reply_to=_request_to(node, MessageType.EVALUATE))


D = 6


def _strategy(cls_config, tmp_path, *overrides):
    cfg = cls_config("federation.num_clients=8", "federation.min_clients=3", "federation.max_update_norm=10",
                     *overrides)
    outer, inner = make_strategies(cfg, RunRecorder(cfg, tmp_path, "r"))
    inner.sent = {"w": torch.zeros(D)}
    if outer is not inner:
        outer.current_arrays = codec.state_to_record(inner.sent)
    return cfg, outer, inner


def _honest():
    return [_train(n, {"w": np.full(D, 0.1)}) for n in range(2, 2 + HONEST)]


def _errors(inner) -> dict[int, str]:
    return {e["node"]: e["reason"] for e in inner.recorder.pending[1]["errors"]}


ATTACK = {"w": np.full(D, -4.0)}  # norm 9.8: inside the update bound of 10, aimed the other way


@pytest.mark.parametrize("claim", [10**12, 2**53 - 1, 2001, 1e15])
def test_a_claimed_record_count_buys_at_most_a_bounded_share_of_the_average(flower_identity, cls_config, tmp_path,
                                                                            claim):
    """A claim is clamped to federation.max_weight_ratio (r = 2) x the round's lower median claim: with 4 honest
    members of 1000 records, the liar weighs at most 2000, a share of r / (r + 4), never the whole average."""
    cfg, outer, inner = _strategy(cls_config, tmp_path)
    r = cfg.federation.max_weight_ratio
    arrays, _ = outer.aggregate_train(1, [*_honest(), _train(9, ATTACK, **{"num-examples": claim})])
    got = arrays.to_numpy_ndarrays()[0]
    ref = np.average(np.stack([np.full(D, 0.1)] * HONEST + [ATTACK["w"]]), axis=0, weights=[1000] * HONEST + [r * 1000])
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    share = r / (r + HONEST)
    assert np.linalg.norm(got - 0.1) <= share * np.linalg.norm(ATTACK["w"] - 0.1) + 1e-5
    liar = inner.recorder.pending[1]["clients"][9]
    assert liar["weight"] == r * 1000 and liar["num_examples"] == claim  # shown as claimed, weighed as clamped


def test_an_absolute_max_weight_clamps_every_claim(flower_identity, cls_config, tmp_path):
    _, outer, inner = _strategy(cls_config, tmp_path, "federation.max_weight=500")
    outer.aggregate_train(1, [*_honest(), _train(9, ATTACK, **{"num-examples": 10**9})])
    assert {c["weight"] for c in inner.recorder.pending[1]["clients"].values()} == {500.0}


@pytest.mark.parametrize("claim", [-3999.999, -1, 0, 0.5, 12.5])
def test_a_negative_zero_or_fractional_weight_drops_that_reply_and_the_aggregate_stays_in_bound(
        flower_identity, cls_config, tmp_path, claim):
    """-3999.999 against 4 x 1000 would divide the weighted sum by 0.001: the reply is dropped instead."""
    _, outer, inner = _strategy(cls_config, tmp_path)
    arrays, _ = outer.aggregate_train(1, [*_honest(), _train(9, ATTACK, **{"num-examples": claim})])
    got = arrays.to_numpy_ndarrays()[0]
    np.testing.assert_allclose(got, np.full(D, 0.1), rtol=1e-6)
    assert np.linalg.norm(got) <= 10
    assert "num-examples" in _errors(inner)[9] and _errors(inner)[9].startswith("rejected reply")


@pytest.mark.parametrize("claim", [math.nan, math.inf, -math.inf])
def test_a_nan_or_inf_weight_drops_that_reply_not_the_server(flower_identity, cls_config, tmp_path, claim):
    _, outer, inner = _strategy(cls_config, tmp_path)
    arrays, _ = outer.aggregate_train(1, [*_honest(), _train(9, ATTACK, **{"num-examples": claim})])
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(D, 0.1), rtol=1e-6)
    assert "not a finite number" in _errors(inner)[9]


@pytest.mark.parametrize("tamper", [
    lambda m: m.content[codec.METRICS].__setitem__("evil", 1.0),             # one extra key
    lambda m: m.content[codec.METRICS].pop("num-examples"),                  # the one required key missing
    lambda m: m.content[codec.METRICS].__setitem__("num-examples", [1.0, 2.0]),  # a list where a number belongs
    lambda m: m.content[codec.METRICS].__setitem__("private", 7),            # a flag that is not 0/1
    lambda m: m.content[codec.METRICS].__setitem__("institution", -5),       # a label out of range
    lambda m: m.content[codec.METRICS].__setitem__("secagg-clipped-count", 0),  # the coordinator's own key
    lambda m: m.content.__setitem__("more", MetricRecord({"x": 1.0})),       # a second MetricRecord
    lambda m: m.content.__setitem__("arrays2", ArrayRecord([np.zeros(D, np.float32)])),  # a second ArrayRecord
    lambda m: m.content.pop(codec.METRICS),                                  # no metrics at all
    lambda m: m.content.__setitem__(codec.ARRAYS, MetricRecord({"w": 1.0})),  # the update is not an ArrayRecord
])
def test_a_malformed_metric_record_drops_that_reply_only(flower_identity, cls_config, tmp_path, tamper):
    _, outer, inner = _strategy(cls_config, tmp_path)
    bad = _train(9, ATTACK)
    tamper(bad)
    arrays, _ = outer.aggregate_train(1, [*_honest(), bad])
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(D, 0.1), rtol=1e-6)
    assert list(_errors(inner)) == [9] and _errors(inner)[9].startswith("rejected")


def test_replies_with_different_optional_keys_are_aggregated_together(flower_identity, cls_config, tmp_path):
    """Flower's strategies refuse replies whose MetricRecords differ in keys, which ended the run; the
    coordinator hands them only its own weight, so a reply without an optional key simply counts."""
    _, outer, inner = _strategy(cls_config, tmp_path)
    odd = _train(9, {"w": np.full(D, 0.6)})
    for key in ("unit-weight", "train-loss", "steps", "private"):
        odd.content[codec.METRICS].pop(key)
    arrays, _ = outer.aggregate_train(1, [*_honest(), odd])
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(D, 0.2), rtol=1e-5)
    assert not _errors(inner)


def test_a_malformed_evaluation_reply_drops_that_reply_only(flower_identity, cls_config, tmp_path):
    _, outer, inner = _strategy(cls_config, tmp_path)
    replies = [_evaluate(n) for n in range(2, 2 + HONEST)]
    replies += [_evaluate(9, evil=1.0), _evaluate(10, accuracy=1.5), _evaluate(11, loss=math.nan),
                _evaluate(12, **{"num-examples": -1})]
    outer.aggregate_evaluate(1, replies)
    line = inner.recorder.rounds[-1]
    assert sorted(e["node"] for e in line["errors"]) == [9, 10, 11, 12]
    assert len(line["clients"]) == HONEST and line["eval_weighted"]["accuracy"] == pytest.approx(0.5)


def test_an_evaluation_reply_cannot_rewrite_the_board_or_buy_the_weighted_figure(flower_identity, cls_config,
                                                                                  tmp_path):
    """Node 9 claims to be institution 0, to hold 10**12 test records and to score 1.0. The board is keyed by the
    authenticated node: institution 0's row keeps node 2's score, and the weighted accuracy moves by at most the
    liar's clamped share (r x 100 against 4 x 100)."""
    cfg, outer, inner = _strategy(cls_config, tmp_path)
    rec = inner.recorder
    outer.aggregate_evaluate(1, [_evaluate(n) for n in range(2, 2 + HONEST)])  # round 1: the honest board
    outer.aggregate_evaluate(2, [*(_evaluate(n) for n in range(2, 2 + HONEST)),
                                 _evaluate(9, institution=0, accuracy=1.0, **{"num-examples": 10**12})])
    line = rec.rounds[-1]
    by_node = {c["node"]: c for c in line["clients"]}
    assert by_node[2]["institution"] == 0 and by_node[2]["eval"]["accuracy"] == 0.5  # untouched
    assert by_node[9]["institution"] not in {0, 1, 2, 3}  # a label of its own, not institution 0's
    r = cfg.federation.max_weight_ratio
    assert line["eval_weighted"]["accuracy"] == pytest.approx((4 * 100 * 0.5 + r * 100 * 1.0) / (400 + r * 100))
    summary = summarize(cfg, rec.rounds, "r", "f", 1, 1, 0.0)
    board = summary["per_institution"]["accuracy"]
    assert board["0"] == 0.5 and len(board) == HONEST + 1


def test_labels_never_collide_and_a_node_keeps_its_own():
    labels = Labels()
    assert labels.assign({2: 0, 3: 1}) == {2: 0, 3: 1}
    got = labels.assign({2: 7, 3: 1, 4: 1, 5: 0, 6: 9, 7: 9, 8: None, 10: 2**40})
    assert got[2] == 0 and got[3] == 1  # a node keeps the label it had
    assert len(set(got.values())) == len(got)  # no two nodes share a label
    assert got[4] < 0 and got[5] < 0 and got[6] < 0 and got[7] < 0 and got[8] < 0 and got[10] < 0


@pytest.mark.parametrize("unit_weight", [-0.999, -1.999, 1e9, 0.0])
def test_client_level_dp_averages_unweighted_whatever_a_reply_claims(flower_identity, cls_config, tmp_path,
                                                                     unit_weight):
    """The noise is calibrated to C/k for an unweighted mean of k clipped updates; a reply's own unit-weight
    (-1.999 against two honest 1s would divide by 0.001) or record count must not reweigh it."""
    c = 1.0
    _, outer, inner = _strategy(cls_config, tmp_path, "privacy.client_level.enabled=true",
                                f"privacy.client_level.clipping_norm={c}", "privacy.client_level.noise_multiplier=1e-9",
                                "federation.min_clients=2")
    honest = [_train(2, {"w": np.full(D, 0.1)}, **{"num-examples": 10**12}), _train(3, {"w": np.full(D, 0.2)})]
    arrays, _ = outer.aggregate_train(1, [*honest, _train(9, ATTACK, **{"unit-weight": unit_weight})])
    got = arrays.to_numpy_ndarrays()[0]
    assert np.linalg.norm(got) <= c * 1.0001  # a mean of updates clipped to C stays within C
    kept = [np.full(D, 0.1), np.full(D, 0.2)]
    np.testing.assert_allclose(got, np.mean(kept, axis=0), atol=1e-5)  # unweighted; the liar's reply dropped
    assert 9 in _errors(inner)


def test_a_reply_that_breaks_aggregation_is_dropped_and_the_round_goes_on(flower_identity, cls_config, tmp_path):
    """No update screen this round (no global adapter on record): a reply whose arrays have other keys makes
    Flower's aggregation raise; the coordinator drops that reply, logs its node, and aggregates the rest."""
    _, outer, inner = _strategy(cls_config, tmp_path)
    inner.sent = None
    arrays, _ = outer.aggregate_train(1, [*_honest(), _train(9, {"v": np.zeros(D)})])
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(D, 0.1), rtol=1e-6)
    assert "aggregation failed with it" in _errors(inner)[9]


def test_a_node_counts_once_per_round(flower_identity, cls_config, tmp_path):
    _, outer, inner = _strategy(cls_config, tmp_path)
    arrays, _ = outer.aggregate_train(1, [*_honest(), _train(9, ATTACK), _train(9, ATTACK), _train(9, ATTACK)])
    ref = np.average(np.stack([np.full(D, 0.1)] * HONEST + [ATTACK["w"]]), axis=0)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], ref, rtol=1e-5)
    assert "second reply" in _errors(inner)[9]


def test_a_reply_to_another_nodes_message_is_dropped(flower_identity, cls_config, tmp_path):
    """Node 9 answers the message the coordinator sent to node 5: it must not speak (or count) for node 5."""
    _, outer, inner = _strategy(cls_config, tmp_path)
    TaskIdentity.node_id = 1
    sent = Message(RecordDict({codec.CONFIG: ConfigRecord({"server-round": 1})}), dst_node_id=5,
                   message_type=MessageType.TRAIN)
    sent.metadata._message_id = "to-node-5"  # as the grid assigns it when it sends
    inner.recorder.remember([sent])
    update = codec.state_to_record({"w": torch.as_tensor(ATTACK["w"], dtype=torch.float32)})
    forged = Message(RecordDict({codec.ARRAYS: update, codec.METRICS: MetricRecord({"num-examples": 1000})}),
                     reply_to=sent)
    forged.metadata._src_node_id = 9  # the sender the SuperLink authenticated
    arrays, _ = outer.aggregate_train(1, [*_honest()[:3], forged])
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(D, 0.1), rtol=1e-6)
    assert "sent to node 5" in _errors(inner)[9]


def test_a_float64_reply_does_not_change_the_global_adapters_dtype(flower_identity, cls_config, tmp_path):
    _, outer, _ = _strategy(cls_config, tmp_path)
    odd = _train(9, {"w": np.full(D, 0.1)})
    odd.content[codec.ARRAYS] = codec.state_to_record({"w": torch.full((D,), 0.1, dtype=torch.float64)})
    arrays, _ = outer.aggregate_train(1, [*_honest(), odd])
    assert codec.record_to_state(arrays)["w"].dtype == torch.float32


def test_one_member_withholding_a_score_does_not_erase_the_weighted_figure(flower_identity, cls_config, tmp_path):
    _, outer, inner = _strategy(cls_config, tmp_path)
    outer.aggregate_evaluate(1, [*(_evaluate(n) for n in range(2, 2 + HONEST)), _evaluate(9, accuracy=codec.WITHHELD)])
    line = inner.recorder.rounds[-1]
    assert line["eval_weighted"]["accuracy"] == pytest.approx(0.5)
    assert line["eval_weighted_over"] == {"accuracy": [HONEST, HONEST + 1]}


def test_weights_reference():
    assert lower_median([1, 2, 3, 4]) == 2 and lower_median([5]) == 5
    assert weights([10, 35, 7, 10**9], equal=False, max_ratio=4, max_weight=None) == [10, 35, 7, 40]
    assert weights([10, 35, 7, 10**9], equal=False, max_ratio=2, max_weight=None) == [10, 20, 7, 20]
    assert weights([10, 35], equal=True, max_ratio=4, max_weight=None) == [1.0, 1.0]
    assert weights([10, 35], equal=False, max_ratio=4, max_weight=20) == [10, 20]


# Robust aggregation: references on tiny arrays ----------------------------------------------------------------

N, F = 8, 1


def _krum_scores(x: np.ndarray, f: int) -> list[float]:
    n = len(x)
    out = []
    for i in range(n):
        d = sorted(float(((x[i] - x[j]) ** 2).sum()) for j in range(n) if j != i)
        out.append(sum(d[:max(1, n - f - 2)]))  # Flower's convention where n - f - 2 < 1
    return out


def _reference(strategy: str, x: np.ndarray) -> np.ndarray:
    if strategy == "median":
        return np.median(x, axis=0)
    if strategy == "trimmed_mean":
        cut = int(0.2 * len(x))
        return np.array([np.mean(sorted(col)[cut:len(col) - cut]) for col in x.T])
    if strategy == "krum":
        return x[int(np.argmin(_krum_scores(x, F)))]
    if strategy == "multi_krum":
        return x[np.argsort(_krum_scores(x, F))[:N - F]].mean(axis=0)
    assert strategy == "bulyan"
    left, chosen = list(range(len(x))), []
    while len(chosen) < N - 2 * F:  # Krum, again and again, on what is left
        best = left[int(np.argmin(_krum_scores(x[left], F)))]
        chosen.append(best)
        left.remove(best)
    sel = x[chosen]
    med = np.median(sel, axis=0)
    beta = len(sel) - 2 * F
    return np.array([np.mean(sorted(sel[:, j], key=lambda v: abs(v - med[j]))[:beta]) for j in range(x.shape[1])])


ROBUST = ["median", "trimmed_mean", "krum", "multi_krum", "bulyan"]


@pytest.mark.parametrize("strategy", ROBUST)
def test_robust_strategies_equal_their_reference(flower_identity, cls_config, tmp_path, strategy):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(N, D)) * 0.1
    _, outer, inner = _strategy(cls_config, tmp_path, f"federation.strategy={strategy}", "federation.min_clients=7",
                                f"federation.byzantine={F}")
    inner.sent = {"w": torch.full((D,), 0.5)}  # the rules run on updates: the global adapter must not matter
    sizes = [int(v) for v in rng.integers(10, 10**6, size=N)]  # robust rules ignore claimed sizes
    replies = [_train(n + 2, {"w": 0.5 + x[n]}, **{"num-examples": sizes[n]}) for n in range(N)]
    arrays, _ = outer.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], 0.5 + _reference(strategy, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ROBUST)
def test_a_norm_bounded_update_aimed_at_a_target_cannot_steer_a_robust_aggregate(flower_identity, cls_config,
                                                                                 tmp_path, strategy):
    """7 honest updates near +0.1 and one of norm 9.8 (inside the bound) aimed at -4: FedAvg moves 1/8 of the
    way there; every robust rule stays inside the honest updates' coordinate-wise range."""
    rng = np.random.default_rng(4)
    honest = 0.1 + rng.normal(size=(7, D)) * 0.01
    replies = [_train(n + 2, {"w": honest[n]}) for n in range(7)] + [_train(9, ATTACK, **{"num-examples": 10**12})]
    _, fedavg, _ = _strategy(cls_config, tmp_path)
    plain = fedavg.aggregate_train(1, [_train(n + 2, {"w": honest[n]}) for n in range(7)] + [_train(9, ATTACK)])[0]
    assert plain.to_numpy_ndarrays()[0].min() < honest.min() - 0.3  # steered
    _, outer, _ = _strategy(cls_config, tmp_path, f"federation.strategy={strategy}", "federation.min_clients=7")
    got = outer.aggregate_train(1, replies)[0].to_numpy_ndarrays()[0]
    assert np.all(got >= honest.min(axis=0) - 1e-6) and np.all(got <= honest.max(axis=0) + 1e-6)


@pytest.mark.parametrize("overrides, key", [
    (["federation.strategy=median", "privacy.client_level.enabled=true"], "privacy.client_level"),
    (["federation.strategy=krum", "federation.min_clients=5", "federation.num_clients=5",
      "federation.secure_aggregation=true"], "federation.secure_aggregation"),
    (["federation.strategy=bulyan", "federation.min_clients=5"], "federation.min_clients >= 4f \\+ 3 = 7"),
    (["federation.strategy=krum", "federation.min_clients=4"], "federation.min_clients >= 2f \\+ 3 = 5"),
    (["federation.strategy=trimmed_mean", "federation.min_clients=4"], "federation.byzantine=1"),
    (["federation.trim_fraction=0.5"], "federation.trim_fraction"),
    (["federation.weighting=size"], "federation.weighting"),
    (["federation.max_weight_ratio=0.5"], "federation.max_weight_ratio"),
    (["federation.byzantine=-1"], "federation.byzantine"),
])
def test_robust_settings_that_cannot_hold_are_refused_naming_the_key(cls_config, overrides, key):
    with pytest.raises(ConfigError, match=key):
        cls_config("federation.num_clients=8", *overrides)


def test_a_robust_strategy_and_client_level_dp_are_refused_even_without_validation(cls_config, tmp_path):
    cfg = cls_config("federation.num_clients=8", "federation.min_clients=3")
    cfg.federation.strategy = "median"
    cfg.privacy.client_level.enabled = True
    with pytest.raises(ConfigError, match="C/k"):
        make_strategy(cfg, RunRecorder(cfg, tmp_path, "r"))


def test_institutions_score_every_evaluate_every_rounds_and_after_the_last(flower_identity, cls_config, tmp_path):
    """federation.evaluate_every=3 over 7 rounds: no evaluate message on rounds 1, 2, 4, 5 (their metrics
    lines are written without scores), messages on 3, 6 and the last round 7."""
    import json

    cfg, outer, inner = _strategy(cls_config, tmp_path, "federation.evaluate_every=3", "federation.rounds=7")
    grid = type("Grid", (), {"get_node_ids": lambda self: list(range(2, 2 + HONEST)),
                             "create_message": lambda self, content, message_type, dst_node_id, group_id, ttl=None:
                             Message(content, dst_node_id=dst_node_id, message_type=message_type,
                                     group_id=group_id)})()
    sent = {}
    for rnd in range(1, 8):
        inner.aggregate_train(rnd, _honest())
        TaskIdentity.node_id = 1
        messages = inner.configure_evaluate(rnd, codec.state_to_record(inner.sent), ConfigRecord({}), grid)
        sent[rnd] = len(messages)
        inner.recorder.remember([])  # hand-built replies carry no message ids to match
        inner.aggregate_evaluate(rnd, [_evaluate(n) for n in range(2, 2 + HONEST)] if messages else [])
    assert sent == {1: 0, 2: 0, 3: HONEST, 4: 0, 5: 0, 6: HONEST, 7: HONEST}
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == list(range(1, 8))  # every round has its line
    assert [bool(line["eval_weighted"]) for line in lines] == [False, False, True, False, False, True, True]
    assert all(c.get("train_loss") is not None for line in lines for c in line["clients"])
    summary = summarize(cfg, inner.recorder.rounds, "r", "f", 1, 1, 1.0)
    assert summary["final"]["accuracy"] == pytest.approx(0.5) and summary["worst_institution"] is not None
    with pytest.raises(ConfigError, match="federation.evaluate_every"):
        cls_config("federation.evaluate_every=0")
