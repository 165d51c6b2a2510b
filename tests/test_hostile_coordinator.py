"""A hostile coordinator against one deployed node, in process through the real ClientApp.

Each test is one attack a coordinator could try with ordinary config keys; the node, holding its own
policy, must refuse it, override it (and say so in its own log), or charge it to the same budget.
The same attacks over real SuperLink/SuperNode processes are in test_deployment.py.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import fedslm.node.app as client_app
from fedslm.node import runtime
from fedslm.config import to_yaml
from fedslm.lora import get_adapter_state
from fedslm.node.releases import Releases
from fedslm.privacy import Ledger
from fedslm.train import build_node
from fedslm.wire import codec
from fedslm.wire.errors import public_reason

CAP = 2.0


@pytest.fixture
def coordinator(cls_config):
    """The coordinator's config (no noise seed: a deployment) and the global adapter it sends."""
    cfg = cls_config("privacy.noise_seed=null", "federation.rounds=1", f"privacy.target_epsilon={CAP}")
    node = build_node(cfg)
    return cfg, get_adapter_state(node.model), node.base.fingerprint


@pytest.fixture
def hospital(node_policy, class_csv, coordinator, tmp_path):
    """A deployed node: its policy (cap ε=2 at δ=1e-4, the coordinator's tiny base allowed)."""
    cfg = coordinator[0]

    def make(**policy):
        path = node_policy(cfg, data=policy.pop("data", class_csv), ledger=tmp_path / "hospital.ledger.json",
                           max_epsilon=policy.pop("max_epsilon", CAP), **policy)
        return Context(run_id=1, node_id=2, node_config={"policy": str(path)}, state=RecordDict(), run_config={})

    return make


def _yaml(cfg, **edits) -> str:
    content = yaml.safe_load(to_yaml(cfg))
    for dotted, value in edits.items():
        section, key = dotted.split("__")
        content[section][key] = value
    return yaml.safe_dump(content)


def _send(context, text, state, *, fingerprint="", server_round=1, run="run-h", evaluate=False,
          frozen="") -> Message:
    TaskIdentity.node_id = 1
    msg = Message(RecordDict({
        codec.ARRAYS: codec.state_to_record(state),
        codec.CONFIG: ConfigRecord({**codec.request_config(text, fingerprint, run, frozen), "server-round": server_round}),
    }), dst_node_id=2, message_type=MessageType.EVALUATE if evaluate else MessageType.TRAIN)
    TaskIdentity.node_id = 2
    return (client_app.evaluate if evaluate else client_app.train)(msg, context)


def _ledger(tmp_path) -> Ledger:
    return Ledger(tmp_path / "hospital.ledger.json")


def _ok(reply):
    assert not reply.has_error(), reply.error
    return reply.content[codec.METRICS]


def _refused(reply, category):
    assert reply.has_error(), "the node served a request it should have refused"
    assert reply.error.reason == public_reason(category), reply.error.reason


# ------------------------------------------------------------------ budget reset (one unit, whatever the split)


@pytest.mark.parametrize("edits", [
    {"data__split_seed": 5}, {"data__test_fraction": 0.4}, {"data__max_train_records": 30},
    {"data__text_column": "label", "data__label_column": "text"}, {"data__source": "elsewhere.csv"},
    {"model__max_length": 12},
], ids=["split-seed", "test-fraction", "max-train-records", "columns", "source", "max-length"])
def test_a_new_split_asked_by_the_coordinator_is_charged_to_the_same_budget(flower_identity, coordinator, hospital,
                                                                            tmp_path, edits):
    cfg, state, fp = coordinator
    node = hospital()
    _ok(_send(node, _yaml(cfg), state, fingerprint=fp))
    _refused(_send(node, _yaml(cfg, **edits), state, server_round=2), "budget-exhausted")
    assert _ledger(tmp_path).summary()[0].rounds == 1


@pytest.mark.parametrize("change", ["append", "reorder", "rename"])
def test_the_institution_changing_its_own_file_keeps_its_budget(flower_identity, coordinator, hospital, class_csv,
                                                                tmp_path, change):
    cfg, state, fp = coordinator
    _ok(_send(hospital(), _yaml(cfg), state, fingerprint=fp))
    lines = class_csv.read_text().splitlines()
    target = class_csv
    if change == "append":
        class_csv.write_text("\n".join(lines + ["fever cough lung,resp"]) + "\n")
    elif change == "reorder":
        class_csv.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    else:
        target = class_csv.rename(class_csv.with_name("records-2026.csv"))
    _refused(_send(hospital(data=target), _yaml(cfg), state, fingerprint=fp, server_round=2), "budget-exhausted")


# ------------------------------------------------------------------ keys only the node decides


def test_a_label_set_other_than_the_policys_is_refused_before_the_records_are_read(flower_identity, coordinator,
                                                                                   hospital, class_csv):
    """A prober sending every label but one would learn, from accept or refuse, whether a record carries it."""
    cfg, state, fp = coordinator
    for labels in (["cardio", "ortho"], ["ortho", "resp", "cardio"], ["cardio", "ortho", "resp", "rare-disease"]):
        _refused(_send(hospital(), _yaml(cfg, data__labels=labels), state), "refused-by-policy")
    class_csv.write_text("text,label\n" + "fever cough,resp\n" * 60)  # the same answer whatever the records
    _refused(_send(hospital(), _yaml(cfg, data__labels=["cardio", "ortho"]), state), "refused-by-policy")


def test_a_partition_id_outside_a_simulation_does_not_make_a_node_trust_the_request(flower_identity, coordinator,
                                                                                   monkeypatch, tmp_path):
    """A deployed SuperNode started with Flower's partition-id (as Flower's own examples do) and no policy
    must refuse, not fall back to the simulation's trust in the scenario."""
    monkeypatch.delenv("FEDSLM_SIMULATION")
    monkeypatch.setattr(runtime, "_SERVING", True)  # served by the node's own runtime: the policy check itself
    cfg, state, fp = coordinator
    text = _yaml(cfg, privacy__enabled=False, privacy__ledger=str(tmp_path / "evil.json"))
    bare = Context(run_id=1, node_id=2, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                   run_config={})
    _refused(_send(bare, text, state, fingerprint=fp), "node-misconfigured")
    assert not (tmp_path / "evil.json").exists()


def test_a_full_batch_round_is_refused_when_the_nodes_size_is_private(flower_identity, coordinator, hospital,
                                                                       tmp_path):
    """A full-batch update is the noised sum divided by n: the noise's size would read n off the adapter."""
    cfg, state, fp = coordinator
    _refused(_send(hospital(), _yaml(cfg, train__full_batch=True), state, fingerprint=fp), "refused-by-policy")
    assert not _ledger(tmp_path).path.exists()


def test_a_deployed_node_serves_only_from_its_own_runtime_never_from_the_bundle(flower_identity, coordinator,
                                                                                hospital, monkeypatch, tmp_path):
    """Outside a simulation the ClientApp (with its mods, as Flower calls it) refuses unless this node's
    runtime (fedslm node start) started the process: a plain SuperNode that loaded the coordinator's
    bundle would run whatever the bundle says, so the honest code does not let that setup work either."""
    monkeypatch.delenv("FEDSLM_SIMULATION")
    cfg, state, fp = coordinator
    node = hospital()

    def via_app():
        TaskIdentity.node_id = 1
        msg = Message(RecordDict({
            codec.ARRAYS: codec.state_to_record(state),
            codec.CONFIG: ConfigRecord({**codec.request_config(_yaml(cfg), fp, "run-h"), "server-round": 1}),
        }), dst_node_id=2, message_type=MessageType.TRAIN)
        TaskIdentity.node_id = 2
        return client_app.app(msg, node)

    _refused(via_app(), "node-misconfigured")
    assert not _ledger(tmp_path).path.exists()
    monkeypatch.setattr(runtime, "_SERVING", True)
    _ok(via_app())
    assert _ledger(tmp_path).summary()[0].rounds == 1


@pytest.mark.parametrize("edits", [{"privacy__noise_multiplier": float("inf")}, {"privacy__max_grad_norm": float("nan")},
                                   {"train__lr": float("inf")}], ids=["sigma-inf", "clip-nan", "lr-inf"])
def test_non_finite_numbers_are_a_bad_request_not_an_endless_plan(flower_identity, coordinator, hospital, edits):
    cfg, state, fp = coordinator
    _refused(_send(hospital(), _yaml(cfg, **edits), state, fingerprint=fp), "bad-request")


def test_a_yaml_alias_bomb_or_an_oversized_config_is_a_bad_request(flower_identity, coordinator, hospital, tmp_path):
    """Nine levels of nine aliases are a few hundred bytes of text and 9**9 strings once walked."""
    cfg, state, fp = coordinator
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    _refused(_send(hospital(), _yaml(cfg) + bomb, state, fingerprint=fp), "bad-request")
    _refused(_send(hospital(), _yaml(cfg) + "#" + "x" * 300_000 + "\n", state, fingerprint=fp), "bad-request")
    assert not _ledger(tmp_path).path.exists()


def test_a_huge_or_non_finite_global_adapter_is_refused_before_training(flower_identity, coordinator, hospital,
                                                                        tmp_path):
    """Weights of 1e36 could make some records' gradients overflow, so that whether the update comes back
    finite would depend on the data."""
    cfg, state, fp = coordinator
    key = sorted(state)[0]
    for value in (1e36, float("nan")):
        bad = dict(state)
        bad[key] = state[key].clone().fill_(value)
        _refused(_send(hospital(), _yaml(cfg), bad, fingerprint=fp), "bad-request")
    assert not _ledger(tmp_path).path.exists()


def test_a_clipping_bound_the_run_does_not_ask_for_is_refused_before_the_budget_is_charged(flower_identity,
                                                                                         coordinator, hospital,
                                                                                         tmp_path):
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    cfg, state, fp = coordinator
    TaskIdentity.node_id = 1
    msg = Message(RecordDict({
        codec.ARRAYS: codec.state_to_record(state),
        codec.CONFIG: ConfigRecord({**codec.request_config(_yaml(cfg), fp, "run-h"), "server-round": 1,
                                    KEY_CLIPPING_NORM: 0.5}),
    }), dst_node_id=2, message_type=MessageType.TRAIN)
    TaskIdentity.node_id = 2
    _refused(client_app.train(msg, hospital()), "bad-request")
    assert not _ledger(tmp_path).path.exists()


def test_a_non_private_round_is_refused_unless_the_policy_allows_it(flower_identity, coordinator, hospital, tmp_path):
    cfg, state, fp = coordinator
    _refused(_send(hospital(), _yaml(cfg, privacy__enabled=False), state, fingerprint=fp), "refused-by-policy")
    assert not _ledger(tmp_path).path.exists()  # refused before a record was touched
    metrics = _ok(_send(hospital(allow_non_private=True), _yaml(cfg, privacy__enabled=False), state, fingerprint=fp))
    assert metrics["private"] == 0
    assert _ledger(tmp_path).summary()[0].epsilon == float("inf")  # charged as ε = ∞, for good


def test_a_noise_seed_is_refused_outside_simulation(flower_identity, coordinator, hospital):
    cfg, state, fp = coordinator
    _refused(_send(hospital(), _yaml(cfg, privacy__noise_seed=7), state, fingerprint=fp), "refused-by-policy")


def test_the_coordinators_delta_and_caps_are_ignored(flower_identity, coordinator, hospital, tmp_path, caplog):
    """δ=0.5 would make almost any σ pass an ε cap; a target and a max ε above the node's cap would spend past it."""
    cfg, state, fp = coordinator
    text = _yaml(cfg, privacy__delta=0.5, privacy__target_epsilon=50.0, privacy__max_epsilon=50.0)
    with caplog.at_level("WARNING", logger="fedslm.node"):
        metrics = _ok(_send(hospital(size_is_public=True), text, state, fingerprint=fp))  # ε is sent
    assert metrics["delta"] == pytest.approx(1e-4)  # the node's max_delta
    assert 0 < metrics["epsilon"] <= CAP + 1e-9
    assert "privacy.delta=0.5 is ignored" in caplog.text and "planning for max_epsilon=2" in caplog.text
    (entry,) = _ledger(tmp_path).entries("all-records")
    assert entry["delta"] == pytest.approx(1e-4)


def _spy_dpsgd(monkeypatch, key: str) -> list:
    """The values of ``key`` the node's training passes to DP-SGD, one per engine it builds."""
    import fedslm.train.local as local

    seen = []
    real = local.DPSGD

    def spy(*args, **kwargs):
        seen.append(kwargs[key])
        return real(*args, **kwargs)

    monkeypatch.setattr(local, "DPSGD", spy)
    return seen


def test_secure_noise_required_by_the_policy_is_used_whatever_the_request_says(flower_identity, coordinator,
                                                                              hospital, monkeypatch):
    seen = _spy_dpsgd(monkeypatch, "secure_mode")
    cfg, state, fp = coordinator
    _ok(_send(hospital(require_secure_noise=True), _yaml(cfg, privacy__secure_mode=False), state, fingerprint=fp))
    assert seen == [True]


def test_a_request_cannot_make_the_node_hold_more_than_its_resource_caps(flower_identity, coordinator, hospital,
                                                                         cls_config, monkeypatch, caplog, tmp_path):
    """train.physical_batch_size=10**6 would put the whole split through one backward pass (its activations,
    and per-record gradients, at once): the node cuts it to its resources.max_physical_batch_size, which
    only chunks the same logical batch, and so for evaluation batches. A head-only round (lora.layers: 0)
    chunks cached sentence vectors instead, one vector a record and no model pass: those chunks are cut to
    resources.max_feature_batch_size, not to the model-pass cap. A max_length past its cap changes what
    is trained: refused before anything is charged."""
    import fedslm.privacy.head_dpsgd as head_dpsgd
    from fedslm.lora.adapter import frozen_digest

    seen = _spy_dpsgd(monkeypatch, "physical_batch_size")
    head_seen = []
    real_head = head_dpsgd.HeadDPSGD
    monkeypatch.setattr(head_dpsgd, "HeadDPSGD",
                        lambda *a, **kw: head_seen.append(kw["physical_batch_size"]) or real_head(*a, **kw))
    cfg, state, fp = coordinator
    node = hospital(max_epsilon=3 * CAP)  # room for the two rounds, each planned at ε = CAP
    path = Path(node.node_config["policy"])
    path.write_text(path.read_text() + yaml.safe_dump({"resources": {"max_physical_batch_size": 3,
                                                                     "max_feature_batch_size": 4,
                                                                     "max_eval_batch_size": 5, "max_length": 16}}))
    text = _yaml(cfg, train__physical_batch_size=10**6, train__eval_batch_size=10**6)
    with caplog.at_level("WARNING", logger="fedslm.node"):
        _ok(_send(node, text, state, fingerprint=fp))
    assert seen == [3] and head_seen == []
    assert "evaluating in batches of 5" in caplog.text
    head_cfg = cls_config("privacy.noise_seed=null", "federation.rounds=1", f"privacy.target_epsilon={CAP}",
                          "lora.layers=0")
    head_node = build_node(head_cfg)
    _ok(_send(node, _yaml(head_cfg, train__physical_batch_size=10**6), get_adapter_state(head_node.model),
              fingerprint=head_node.base.fingerprint, server_round=2, frozen=frozen_digest(head_node.model)))
    assert seen == [3] and head_seen == [4]
    _refused(_send(node, _yaml(cfg, model__max_length=17), state, fingerprint=fp, server_round=3), "refused-by-policy")
    assert _ledger(tmp_path).summary()[0].rounds == 2


def test_with_a_size_floor_the_noise_level_says_nothing_about_the_record_count(flower_identity, coordinator,
                                                                              node_policy, class_csv, tmp_path):
    """A coordinator can craft a global adapter whose gradients vanish and read σ·C/b off the update: σ,
    calibrated for rate b/n, then gives n away. Two hospitals of 108 and 54 training records with one
    public floor of 50 are planned and charged alike (σ for rate b/50); without the floor their σ differ."""
    cfg, state, fp = coordinator
    small = tmp_path / "small.csv"
    small.write_text("\n".join(class_csv.read_text().splitlines()[:61]) + "\n")

    def entry(data, name, **floor):
        path = node_policy(cfg, data=data, name=name, ledger=tmp_path / f"{name}.ledger.json", max_epsilon=CAP,
                           **floor)
        context = Context(run_id=1, node_id=2, node_config={"policy": str(path)}, state=RecordDict(), run_config={})
        _ok(_send(context, _yaml(cfg), state, fingerprint=fp))
        (e,) = Ledger(tmp_path / f"{name}.ledger.json").entries("all-records")
        return e["noise_multiplier"], e["sample_rate"]

    big_floored, small_floored = entry(class_csv, "big-f", size_floor=50), entry(small, "small-f", size_floor=50)
    assert big_floored == small_floored
    assert big_floored[1] == pytest.approx(cfg.train.batch_size / 50)
    assert entry(class_csv, "big") != entry(small, "small")  # the leak the floor closes
    path = node_policy(cfg, data=small, name="over", ledger=tmp_path / "over.ledger.json", size_floor=100)
    context = Context(run_id=1, node_id=2, node_config={"policy": str(path)}, state=RecordDict(), run_config={})
    _refused(_send(context, _yaml(cfg), state, fingerprint=fp), "node-misconfigured")
    assert not (tmp_path / "over.ledger.json").exists()


def test_the_request_cannot_choose_where_the_node_keeps_its_ledger_or_writes(flower_identity, coordinator, hospital,
                                                                           tmp_path):
    cfg, state, fp = coordinator
    fresh, out = tmp_path / "fresh-ledger.json", tmp_path / "coordinator-chosen"
    _ok(_send(hospital(), _yaml(cfg), state, fingerprint=fp))
    text = _yaml(cfg, privacy__ledger=str(fresh), privacy__max_epsilon=100.0, output__dir=str(out))
    _refused(_send(hospital(), text, state, server_round=2), "budget-exhausted")  # the node's own ledger is full
    assert not fresh.exists() and not out.exists()


def test_a_base_model_the_policy_does_not_list_is_never_loaded(flower_identity, coordinator, hospital, tmp_path,
                                                               monkeypatch):
    import fedslm.node.institution as institution

    def never(*args, **kwargs):
        raise AssertionError("the node loaded a model its policy does not allow")

    monkeypatch.setattr(institution, "load_base", never)
    institution._LOADED.clear()
    cfg, state, _ = coordinator
    elsewhere = tmp_path / "some-folder-on-the-node"
    elsewhere.mkdir()
    _refused(_send(hospital(), _yaml(cfg, model__name=str(elsewhere)), state), "refused-by-policy")
    _refused(_send(hospital(), _yaml(cfg, model__name="gemma3-270m"), state), "refused-by-policy")


def test_a_held_out_set_smaller_than_the_policy_minimum_is_not_scored(flower_identity, coordinator, hospital,
                                                                      tmp_path):
    """data.max_test_records=1 would score one record; the node scores at least its minimum, or refuses."""
    cfg, state, fp = coordinator
    _ok(_send(hospital(min_test_records=5), _yaml(cfg, data__max_test_records=1), state, fingerprint=fp, evaluate=True))
    assert _ledger(tmp_path).read()["units"]["held-out"]["num_examples"] >= 5
    _refused(_send(hospital(min_test_records=1000), _yaml(cfg), state, fingerprint=fp, evaluate=True),
             "node-misconfigured")


def test_a_node_without_a_policy_or_caps_refuses_to_serve(flower_identity, coordinator, node_policy, class_csv,
                                                          tmp_path, caplog):
    cfg, state, fp = coordinator
    bare = Context(run_id=1, node_id=2, node_config={"institution": 0}, state=RecordDict(), run_config={})
    _refused(_send(bare, _yaml(cfg), state, fingerprint=fp), "node-misconfigured")
    path = node_policy(cfg, data=class_csv)
    policy = yaml.safe_load(path.read_text())
    del policy["privacy"]["max_delta"]
    path.write_text(yaml.safe_dump(policy))
    uncapped = Context(run_id=1, node_id=2, node_config={"policy": str(path)}, state=RecordDict(), run_config={})
    with caplog.at_level("WARNING", logger="fedslm.node"):
        _refused(_send(uncapped, _yaml(cfg), state, fingerprint=fp), "node-misconfigured")
    assert "privacy.max_delta is required" in caplog.text


# ------------------------------------------------------------------ the node read through its errors


def test_an_env_interpolation_is_never_resolved_and_nothing_of_the_node_is_in_a_reply(flower_identity, coordinator,
                                                                                       hospital, monkeypatch):
    monkeypatch.setenv("FEDSLM_TEST_SECRET", "the-node-secret")
    cfg, state, fp = coordinator
    for key in ("model__name", "data__labels", "output__dir"):
        value = "${oc.env:FEDSLM_TEST_SECRET}"
        reply = _send(hospital(), _yaml(cfg, **{key: [value, "x"] if key == "data__labels" else value}), state)
        _refused(reply, "bad-request")
        assert "the-node-secret" not in reply.error.reason


def test_a_cell_value_never_reaches_an_error_reply(flower_identity, coordinator, hospital, class_csv, caplog):
    cfg, state, fp = coordinator
    class_csv.write_text(class_csv.read_text() + "chest pain,123-45-6000\n")  # a label no one agreed on
    with caplog.at_level("WARNING", logger="fedslm.node"):
        reply = _send(hospital(), _yaml(cfg, data__labels=["cardio", "ortho", "resp"]), state)
    _refused(reply, "node-misconfigured")
    assert "123-45-6000" not in reply.error.reason and str(class_csv) not in reply.error.reason
    assert "123-45-6000" in caplog.text  # the operator sees it in the node's own log


def test_an_unexpected_failure_replies_internal_with_no_text_of_the_exception(flower_identity, coordinator,
                                                                              hospital, monkeypatch):
    import fedslm.node.serve as serve

    def boom(*args, **kwargs):
        raise RuntimeError(f"disk full at {os.environ.get('HOME')}")

    monkeypatch.setattr(serve, "train_round", boom)
    cfg, state, fp = coordinator
    reply = _send(hospital(), _yaml(cfg), state, fingerprint=fp)
    _refused(reply, "internal")
    assert "disk" not in reply.error.reason


# ------------------------------------------------------------------ smaller items


def test_a_second_adapter_for_a_round_is_kept_beside_the_first_and_both_replay_free(flower_identity, coordinator,
                                                                                   hospital, tmp_path):
    cfg, state, fp = coordinator
    moved = {k: v + 0.01 for k, v in state.items()}
    node = hospital(max_epsilon=10.0)
    _ok(_send(node, _yaml(cfg), state, fingerprint=fp))
    _ok(_send(node, _yaml(cfg), moved, fingerprint=fp))
    folder = Releases(_ledger(tmp_path).path).folder
    kept = sorted(folder.glob("*.safetensors"))
    assert len(kept) == 2  # one file per input adapter: the second no longer overwrites the first
    for path in kept:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for adapter in (state, moved):  # both replayed, neither charged again
        assert _ok(_send(node, _yaml(cfg), adapter, fingerprint=fp))["replayed"] == 1
    assert _ledger(tmp_path).summary()[0].rounds == 2


def test_a_policy_and_data_path_with_a_hash_sign_are_read_whole(flower_identity, coordinator, node_policy, class_csv,
                                                                tmp_path):
    cfg, state, fp = coordinator
    folder = tmp_path / "ward #3"
    folder.mkdir()
    data = class_csv.rename(folder / "records #1.csv")
    path = node_policy(cfg, data=data, path=folder / "policy #2.yaml")
    context = Context(run_id=1, node_id=2, node_config={"policy": str(path)}, state=RecordDict(), run_config={})
    _ok(_send(context, _yaml(cfg), state, fingerprint=fp))


def test_an_audit_is_charged_to_the_privacy_unit(cls_config):
    from fedslm.audit import run_audit
    from fedslm.errors import BudgetExceededError

    cfg = cls_config("federation.rounds=1", "privacy.target_epsilon=1", "privacy.max_epsilon=1.05",
                     "privacy.noise_seed=null")
    run_audit(cfg, canaries=10, seed=0)
    (spend,) = Ledger(Path(cfg.output.dir) / "privacy_ledger.json").summary()
    assert spend.unit == "all-records" and spend.rounds == 1
    with pytest.raises(BudgetExceededError):  # an audit spends the same budget as training
        run_audit(cfg, canaries=10, seed=1)


def test_node_init_writes_a_template_that_node_check_accepts(tmp_path, class_csv):
    from typer.testing import CliRunner

    from fedslm.cli.main import app

    runner = CliRunner()
    path = tmp_path / "policy.yaml"
    res = runner.invoke(app, ["node", "init", str(path), "--data", str(class_csv), "--name", "st-mary"])
    assert res.exit_code == 0, res.output
    assert "max_epsilon" in path.read_text() and "#" in path.read_text()  # commented
    assert "size_floor: 100" in path.read_text()  # 108 training records, rounded down to two digits
    res = runner.invoke(app, ["node", "check", str(path), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["name"] == "st-mary" and report["data"]["train_records"] + report["data"]["test_records"] == 120
    assert report["privacy"]["max_delta"] < report["privacy"]["one_over_n"]
    again = runner.invoke(app, ["node", "init", str(path)])
    assert again.exit_code == 2 and "never overwritten" in again.output
    text = path.read_text().replace("max_epsilon: 8.0", "max_epsilon: -1")
    path.write_text(text)
    bad = runner.invoke(app, ["node", "check", str(path)])
    assert bad.exit_code == 2 and "privacy.max_epsilon must be > 0" in bad.output


def test_node_keygen_makes_an_identity_the_policy_reads_and_check_shows(tmp_path, class_csv):
    """keygen writes a 0600 private key and a .pub; a policy names them by relative paths; node check shows
    the fingerprints; a missing peer key, or peers without an own identity, stop at load naming the key."""
    import os
    import stat

    from typer.testing import CliRunner

    from fedslm.cli.main import app
    from fedslm.wire import identity

    runner = CliRunner()
    for name in ("a", "b"):
        res = runner.invoke(app, ["node", "keygen", str(tmp_path / "keys" / f"{name}.key")])
        assert res.exit_code == 0, res.output
    assert stat.S_IMODE(os.stat(tmp_path / "keys" / "a.key").st_mode) == 0o600
    again = runner.invoke(app, ["node", "keygen", str(tmp_path / "keys" / "a.key")])
    assert again.exit_code == 2 and "one identity" in again.output
    path = tmp_path / "policy.yaml"
    assert runner.invoke(app, ["node", "init", str(path), "--data", str(class_csv)]).exit_code == 0
    base = path.read_text()
    path.write_text(base.replace("identity_key: null", "identity_key: keys/a.key").replace(
        "peers: {}", "peers: {b: keys/b.key.pub}"))
    res = runner.invoke(app, ["node", "check", str(path), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)["secure_aggregation"]
    assert report["peers"] == {"b": identity.fingerprint(identity.load_public(tmp_path / "keys" / "b.key.pub"))}
    assert report["identity"] == identity.fingerprint(identity.load_public(tmp_path / "keys" / "a.key.pub"))
    path.write_text(base.replace("peers: {}", "peers: {b: keys/missing.pub}").replace("identity_key: null",
                                                                                      "identity_key: keys/a.key"))
    bad = runner.invoke(app, ["node", "check", str(path)])
    assert bad.exit_code == 2 and "secure_aggregation" in bad.output and "missing.pub" in bad.output
    path.write_text(base.replace("peers: {}", "peers: {b: keys/b.key.pub}"))
    bad = runner.invoke(app, ["node", "check", str(path)])
    assert bad.exit_code == 2 and "secure_aggregation.peers needs secure_aggregation.identity_key" in bad.output


# ------------------------------------------------------------------ what goes out: DP releases or public facts


def test_a_deployed_evaluation_is_a_noised_release_charged_to_the_held_out_unit(flower_identity, coordinator,
                                                                               hospital, tmp_path):
    """data.max_test_records=1 and a crafted head would read one record's label from an exact accuracy;
    the node releases noised sums, charged to its held-out unit before scoring, never to training."""
    from fedslm.wire.codec import WITHHELD

    cfg, state, fp = coordinator
    node = hospital()
    first = _ok(_send(node, _yaml(cfg), state, fingerprint=fp, evaluate=True))
    second = _ok(_send(node, _yaml(cfg), state, fingerprint=fp, evaluate=True))
    assert first["accuracy"] != second["accuracy"] or first["num-examples"] != second["num-examples"]  # noised
    assert first["macro-f1"] == WITHHELD and first["seconds"] == WITHHELD
    (held_out,) = [s for s in _ledger(tmp_path).summary() if s.unit == "held-out"]
    assert held_out.rounds == 2 and 0 < held_out.epsilon <= 2.0 + 1e-6  # 1.0 per evaluation (policy default)
    assert "all-records" not in {s.unit for s in _ledger(tmp_path).summary()}  # training budget untouched


def test_evaluation_is_refused_past_the_held_out_budget(flower_identity, coordinator, hospital, node_policy,
                                                        class_csv, tmp_path):
    import yaml as _yaml_lib

    cfg, state, fp = coordinator
    path = node_policy(cfg, data=class_csv, ledger=tmp_path / "hospital.ledger.json")
    policy = _yaml_lib.safe_load(path.read_text())
    policy["evaluation"] = {"max_epsilon": 1.1, "epsilon_per_evaluation": 1.0}
    path.write_text(_yaml_lib.safe_dump(policy))
    node = Context(run_id=1, node_id=2, node_config={"policy": str(path)}, state=RecordDict(), run_config={})
    _ok(_send(node, _yaml(cfg), state, fingerprint=fp, evaluate=True))
    _refused(_send(node, _yaml(cfg), state, fingerprint=fp, evaluate=True), "budget-exhausted")


def test_the_evaluation_release_is_the_calibrated_gaussian_mechanism():
    """σ from the calibration costs exactly ε per evaluation (RDP), and the noise on each released sum has
    std σ·√k: a one-record held-out set's label is hidden under noise of about that size."""
    import numpy as np

    from fedslm.node.metrics import calibrate, release_evaluation
    from fedslm.privacy import epsilon

    rel = calibrate(1.0, 1e-5, 3)
    assert epsilon([(rel.noise_multiplier, 1.0, 1)], 1e-5) == pytest.approx(1.0, rel=0.02)
    counts = {"records": 1000, "correct": 600, "loss_sum": 500.0}
    draws = [release_evaluation(counts, rel, loss_cap=10.0, with_loss=True, task="classification")
             for _ in range(3000)]
    records = np.array([d["num-examples"] for d in draws], dtype=float)
    assert np.std(records) == pytest.approx(rel.noise_std, rel=0.1) and abs(np.mean(records) - 1000) < 1
    # accuracy = (600 + e1) / (1000 + e0): its spread is that of e1 and of 0.6·e0 together
    accuracy = np.array([d["accuracy"] for d in draws]) * 1000
    assert np.std(accuracy) == pytest.approx(rel.noise_std * np.sqrt(1 + 0.6 ** 2), rel=0.1)
    assert rel.noise_std > 5  # a single record's label (a change of 1) is lost in it


def test_training_metrics_that_depend_on_the_records_are_withheld(flower_identity, coordinator, hospital):
    """Differencing train-loss between record caps would read one record's loss; the node sends none of it,
    nor the sampling's empty steps, nor anything that reveals its size (unless its policy makes that public)."""
    from fedslm.wire.codec import WITHHELD

    cfg, state, fp = coordinator
    metrics = _ok(_send(hospital(max_epsilon=10.0), _yaml(cfg), state, fingerprint=fp))
    for key in ("train-loss", "empty-steps", "train-seconds", "seconds", "sample-rate", "noise-multiplier", "epsilon"):
        assert metrics[key] == WITHHELD, key
    assert metrics["num-examples"] == 1 and metrics["steps"] == cfg.train.local_steps
    public = _ok(_send(hospital(max_epsilon=10.0, size_is_public=True), _yaml(cfg), state, fingerprint=fp,
                       server_round=2))
    assert public["num-examples"] > 1 and public["sample-rate"] > 0 and public["train-loss"] == WITHHELD
    assert 0 < public["epsilon"] <= 10.0
