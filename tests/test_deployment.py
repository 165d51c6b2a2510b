"""Deployment with real processes on 127.0.0.1: a SuperLink with TLS and SuperNode authentication,
three enrolled SuperNodes, `flwr run` of the same apps. Faults: a SuperNode killed mid-run, the
coordinator killed mid-round and resumed, malformed updates sent over the wire, strangers and
plain text refused. Every process is stopped by PID (with its descendants) in teardown, also on failure."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fedslm.deploy.certs import make_credentials
from fedslm.simulation.simulate import free_port, stop_process_tree
from fedslm.privacy import Ledger
from fedslm.wire.errors import public_reason

from conftest import CLASS_WORDS, _class_rows

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def federation(tmp_path):
    creds = make_credentials(tmp_path / "creds", ["127.0.0.1"], ["h0", "h1", "h2"])
    stranger = make_credentials(tmp_path / "stranger", ["127.0.0.1"], ["s"]).institutions["s"][0]
    port = free_port()
    home = tmp_path / ".flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fed"\n[superlink.fed]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{creds.ca_cert}"\n')
    # Real deployed nodes: no simulation flag in their environment (conftest sets one for in-process tests).
    machine = {k: v for k, v in os.environ.items() if k != "FEDSLM_SIMULATION"}
    env = {**machine, "FLWR_HOME": str(home), "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
           "FLWR_DISABLE_UPDATE_CHECK": "1"}
    procs: list[subprocess.Popen] = []

    def start(cmd, log):
        proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, stdin=subprocess.DEVNULL)
        procs.append(proc)
        return proc

    def supernode(key, name, node_config="", insecure=False, retries=None, own_code=True):
        """A SuperNode as the README starts one (`fedslm node start`: it serves its own installed ClientApp),
        or with ``own_code=False`` a plain flower-supernode that runs the bundle's (an adversarial node)."""
        start_cmd = [str(BIN / "fedslm"), "node", "start"] if own_code else [str(BIN / "flower-supernode")]
        cmd = start_cmd + ["--superlink", f"127.0.0.1:{port}", "--port", str(free_port())]
        cmd += ["--insecure"] if insecure else ["--root-certificates", str(creds.ca_cert)]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        if node_config:
            cmd += ["--node-config", node_config]
        if retries is not None:
            cmd += ["--max-retries", str(retries), "--max-wait-time", "15"]
        return start(cmd, tmp_path / f"{name}.log")

    def superlink():
        """Start (or restart) the SuperLink; its state (enrolled keys, runs) lives in a file."""
        proc = start([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(creds.ca_cert), "--ssl-certfile",
                      str(creds.superlink_cert), "--ssl-keyfile", str(creds.superlink_key), "--enable-supernode-auth",
                      "--disable-runtime-dependency-installation", "--database", str(tmp_path / "superlink.db"),
                      "--host", "127.0.0.1", "--port", str(port)], tmp_path / f"superlink-{len(procs)}.log")
        deadline = time.monotonic() + 60
        while True:
            try:
                ctx = ssl.create_default_context(cafile=str(creds.ca_cert))
                if httpx.get(f"https://127.0.0.1:{port}/health", verify=ctx, timeout=2).is_success:
                    return proc
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "SuperLink did not start"
            time.sleep(0.5)

    try:
        link = superlink()
        yield {"creds": creds, "stranger": stranger, "env": env, "port": port, "supernode": supernode,
               "tmp": tmp_path, "superlink": superlink, "link": link}
    finally:
        for proc in reversed(procs):
            stop_process_tree(proc)


def _write_institution_files(tmp: Path) -> list[Path]:
    rows = _class_rows(150, seed=3)
    files = []
    for i in range(3):
        path = tmp / f"h{i}.csv"
        path.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows[i::3]))
        files.append(path)
    return files


def _policies(tmp: Path, model: Path, node_policy, privacy=None, identities=False) -> list[str]:
    """Each institution's node config: its policy (its file, ledger, caps, the tiny base it allows).
    ``identities``: each institution also has a SecAgg+ identity key and lists the others' public keys."""
    import yaml

    from fedslm.wire import identity

    files = _write_institution_files(tmp)
    configs = []
    names = [f"h{i}" for i in range(len(files))]
    if identities:
        for name in names:
            identity.generate(tmp / "keys" / f"{name}.key")
    for i, path in enumerate(files):
        # Size public: these nodes may report their record count and ε, which the tests check.
        policy = node_policy(data=path, name=f"h{i}", ledger=tmp / f"ledger-h{i}.json", max_epsilon=3.0,
                             models=[model], size_is_public=True, **(privacy or {}).get(i, {}))
        if identities:
            section = {"identity_key": str(tmp / "keys" / f"h{i}.key"),
                       "peers": {n: str(tmp / "keys" / f"{n}.key.pub") for n in names if n != f"h{i}"}}
            policy.write_text(policy.read_text() + yaml.safe_dump({"secure_aggregation": section}))
        configs.append(f'institution={i} policy="{policy}"')
    return configs


def test_killed_node_round_completes_and_restarted_node_keeps_its_ledger(federation, tiny_bert_dir, node_policy):
    import psutil

    f = federation
    tmp, env = f["tmp"], f["env"]
    for name in ("h0", "h1", "h2"):
        subprocess.run([str(BIN / "flwr"), "supernode", "register", str(f["creds"].institutions[name][1]), "fed"],
                       env=env, check=True, capture_output=True, cwd=tmp)
    configs = _policies(tmp, tiny_bert_dir, node_policy)
    nodes = [f["supernode"](f["creds"].institutions[f"h{i}"][0], f"h{i}", configs[i]) for i in range(3)]
    out = tmp / "run"
    scenario = tmp / "scenario.yaml"
    scenario.write_text(json.dumps({
        "model": {"name": str(tiny_bert_dir), "max_length": 16}, "lora": {"r": 2, "alpha": 4},
        "data": {"labels": sorted(CLASS_WORDS)}, "privacy": {"target_epsilon": 3.0},
        "train": {"batch_size": 8, "physical_batch_size": 8, "local_steps": 2},
        # One node scores each round: evaluation is not what this test is about (each is a process).
        "federation": {"num_clients": 3, "min_clients": 2, "rounds": 4, "round_timeout": 180,
                       "fraction_evaluate": 0.34},
        "output": {"dir": str(out)},
    }))
    with open(tmp / "run.log", "wb") as log:
        run = subprocess.Popen([str(BIN / "flwr"), "run", str(ROOT), "fed", "--stream", "--run-config",
                                f"fedslm-config={json.dumps(str(scenario))}"], env=env, cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").exists():  # round 1 done
            assert run.poll() is None and time.monotonic() < deadline, (tmp / "run.log").read_text()[-2000:]
            time.sleep(0.5)
        victim = nodes[2]
        children = psutil.Process(victim.pid).children(recursive=True)
        victim.kill()  # kill -9 the SuperNode and its ClientApp processes mid-run
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        victim.wait(timeout=30)
        ledger = Ledger(tmp / "ledger-h2.json")
        after_round1 = ledger.summary()[0]
        # Round 2 goes on without it once the SuperLink sees its heartbeat stop; then the institution
        # restarts it (the SuperLink lets the same key in again once the old session is gone).
        while len((out / "metrics.jsonl").read_text().splitlines()) < 2:
            assert run.poll() is None and time.monotonic() < deadline + 240, (tmp / "run.log").read_text()[-2000:]
            time.sleep(0.5)
        f["supernode"](f["creds"].institutions["h2"][0], "h2-restarted", configs[2])
        assert run.wait(timeout=420) == 0, (tmp / "run.log").read_text()[-3000:]
    finally:
        if run.poll() is None:
            stop_process_tree(run)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 4  # the run finished despite the dead node
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["clients"]) >= 2 for r in rounds)
    assert sorted(c["institution"] for c in rounds[1]["clients"]) == [0, 1]
    assert "Node Unavailable" in rounds[1]["errors"][0]["reason"]  # named, with the reason
    # The restarted node rejoined, and its ledger continued from where it was instead of resetting.
    assert 2 in [c["institution"] for c in rounds[-1]["clients"]]
    later = ledger.summary()[0]
    entries = ledger.entries(later.unit)
    assert entries[0]["round"] == 1 and entries[-1]["round"] == 4
    assert later.epsilon > after_round1.epsilon and later.steps == after_round1.steps * len(entries)
    eps_reported = next(c["epsilon"] for c in rounds[-1]["clients"] if c["institution"] == 2)
    assert eps_reported == pytest.approx(later.epsilon)


def _enrol_and_start(f, model, node_policy, names=("h0", "h1", "h2"), extra=None, privacy=None, bundle_code=(),
                     identities=False):
    tmp, env = f["tmp"], f["env"]
    for name in names:
        subprocess.run([str(BIN / "flwr"), "supernode", "register", str(f["creds"].institutions[name][1]), "fed"],
                       env=env, check=True, capture_output=True, cwd=tmp)
    configs = _policies(tmp, model, node_policy, privacy, identities=identities)
    return [f["supernode"](f["creds"].institutions[f"h{i}"][0], f"h{i}", cfg + (extra or {}).get(i, ""),
                           own_code=i not in bundle_code) for i, cfg in enumerate(configs[:len(names)])]


def _scenario(tmp: Path, out: Path, model: Path, lora=None, privacy=None, **federation) -> Path:
    scenario = tmp / "scenario.yaml"
    scenario.write_text(json.dumps({
        "model": {"name": str(model), "max_length": 16}, "lora": {"r": 2, "alpha": 4, **(lora or {})},
        "data": {"labels": sorted(CLASS_WORDS)}, "privacy": {"target_epsilon": 3.0, **(privacy or {})},
        "train": {"batch_size": 8, "physical_batch_size": 8, "local_steps": 2},
        "federation": {"num_clients": 3, "min_clients": 3, "round_timeout": 120, **federation},
        "output": {"dir": str(out)},
    }))
    return scenario


def _flwr_run(app: Path, scenario: Path, env, log: Path) -> subprocess.Popen:
    with open(log, "ab") as fh:
        return subprocess.Popen([str(BIN / "flwr"), "run", str(app), "fed", "--stream", "--run-config",
                                 f"fedslm-config={json.dumps(str(scenario))}"], env=env, cwd=app, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _kill9(proc: subprocess.Popen) -> None:
    import psutil

    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(timeout=30)


def _rounds(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_coordinator_killed_mid_round_resumes_without_repeating_or_double_charging(federation, tiny_bert_dir,
                                                                                  node_policy):
    """kill -9 the SuperLink (and its ServerApp) right after every node paid for round 2; restart it
    and launch the same run again: it continues from the checkpoint, each round is in metrics.jsonl
    once, and each ledger holds each round once (a round paid for but lost is answered from the
    node's kept update, not trained and charged again)."""
    f = federation
    tmp, env = f["tmp"], f["env"]
    _enrol_and_start(f, tiny_bert_dir, node_policy)
    out = tmp / "run"
    scenario = _scenario(tmp, out, tiny_bert_dir, rounds=3, fraction_evaluate=0.34)
    ledgers = [Ledger(tmp / f"ledger-h{i}.json") for i in range(3)]

    def paid_rounds(ledger):  # training rounds (the held-out unit pays for each evaluation on its own)
        if not ledger.path.exists():
            return []
        return [e["round"] for e in ledger.entries("all-records")]

    run = _flwr_run(ROOT, scenario, env, tmp / "run.log")
    try:
        deadline = time.monotonic() + 300
        while not all(2 in paid_rounds(ledger) for ledger in ledgers):
            assert run.poll() is None and time.monotonic() < deadline, (tmp / "run.log").read_text()[-3000:]
            time.sleep(0.1)
        _kill9(f["link"])  # the SuperLink, its SuperExec and the ServerApp, with no chance to clean up
    finally:
        stop_process_tree(run)
    done = json.loads((out / "checkpoint" / "state.json").read_text())["round"]
    assert done in (1, 2) and [r["round"] for r in _rounds(out)][:done] == list(range(1, done + 1))

    f["superlink"]()  # same database: the enrolled keys are still there; the SuperNodes reconnect
    rerun = _flwr_run(ROOT, scenario, env, tmp / "rerun.log")
    try:
        assert rerun.wait(timeout=400) == 0, (tmp / "rerun.log").read_text()[-3000:]
    finally:
        stop_process_tree(rerun)
    for name in ("config.yaml", "summary.json", "report.png", "adapter/adapter_model.safetensors"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and summary["resumed_after_round"] == done
    print(f"coordinator killed with {done} round(s) checkpointed")
    rounds = _rounds(out)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert len({r["run_id"] for r in rounds}) == 1  # the resumed rounds belong to the same run
    for ledger in ledgers:
        assert paid_rounds(ledger) == [1, 2, 3]  # nothing charged twice
        assert len({e["run"] for spend in ledger.summary() for e in ledger.entries(spend.unit)}) == 1
    if done == 1:  # round 2 was lost after every node paid for it: all three sent their kept update
        assert all(c.get("replayed") for c in rounds[1]["clients"]) and len(rounds[1]["clients"]) == 3
    final_eps = {c["institution"]: c["epsilon"] for c in rounds[-1]["clients"]}
    for i, ledger in enumerate(ledgers):
        assert final_eps[i] == pytest.approx(ledger.summary()[0].epsilon) and final_eps[i] <= 3.0 + 1e-9


def _test_app(tmp: Path, **components: str) -> Path:
    """This project's apps, with tests/apps/<module>.py as its ClientApp and/or ServerApp
    (``clientapp="module"``, ``serverapp="module"``)."""
    app = tmp / ("-".join(components.values()) + "-app")
    shutil.copytree(ROOT / "clients", app / "clients", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "server", app / "server", ignore=shutil.ignore_patterns("__pycache__"))
    text = (ROOT / "pyproject.toml").read_text()
    for component, module in components.items():
        shutil.copy(ROOT / "tests" / "apps" / f"{module}.py", app / f"{module}.py")
        default = {"clientapp": "clients.app:app", "serverapp": "server.app:app"}[component]
        text = text.replace(f'{component} = "{default}"', f'{component} = "{module}:app"')
    modules = ", ".join(f'"{m}.py"' for m in components.values())
    text = re.sub(r"(?m)^fab-include = .*$", f'fab-include = [{modules}, "clients/*.py", "server/*.py"]', text)
    (app / "pyproject.toml").write_text(text)
    return app


def _faulty_app(tmp: Path) -> Path:
    """This project's apps, with a ClientApp that corrupts its replies as its node config says: the two
    adversarial nodes run it (plain SuperNodes run the bundle's code); the honest node runs its own."""
    return _test_app(tmp, clientapp="faulty_client")


def test_strangers_are_refused_and_malformed_updates_over_the_wire_are_rejected(federation, tiny_bert_dir,
                                                                                node_policy):
    f = federation
    tmp, env = f["tmp"], f["env"]
    faults = {1: ["nan", "shape", "extra-key"], 2: ["missing-key", "norm", "oversized"]}
    _enrol_and_start(f, tiny_bert_dir, node_policy, extra={i: f' faults="{",".join(v)}"' for i, v in faults.items()},
                     bundle_code=faults)
    # Meanwhile, a node whose key was never enrolled, and a plain-text node, try to join.
    stranger = f["supernode"](f["stranger"], "stranger", retries=1)
    plain = f["supernode"](None, "plain", insecure=True, retries=1)
    out = tmp / "run"
    run = _flwr_run(_faulty_app(tmp), _scenario(tmp, out, tiny_bert_dir, rounds=3, min_clients=1,
                                                         fraction_evaluate=0.34), env, tmp / "run.log")
    try:
        assert run.wait(timeout=400) == 0, (tmp / "run.log").read_text()[-3000:]
    finally:
        stop_process_tree(run)
    # The stranger is refused and gives up; the plain-text node gets no connection to the TLS SuperLink.
    assert stranger.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in (tmp / "stranger.log").read_text()
    assert plain.wait(timeout=120) != 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{f['port']}/health", timeout=3)
    expected = {"nan": "NaN or inf", "shape": "has shape", "extra-key": "unexpected ['base_model.model.bert",
                "missing-key": "missing [", "norm": "exceeds the bound", "oversized": "oversized message"}
    rounds = _rounds(out)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in rounds:
        honest = [c for c in r["clients"] if "train_loss" in c]
        assert [c["institution"] for c in honest] == [0]  # only the honest update was aggregated
        rejected = [e for e in r["errors"] if e["phase"] == "train"]
        assert len({e["node"] for e in rejected}) == 2 and honest[0]["node"] not in {e["node"] for e in rejected}
        for inst in (1, 2):
            why = expected[faults[inst][r["round"] - 1]]
            assert any(why in e["reason"] and e["reason"].startswith("rejected update") for e in rejected), (why, r)
    assert json.loads((out / "summary.json").read_text())["rounds_completed"] == 3


def test_secure_aggregation_client_level_dp_and_ffa_work_in_deployment(federation, tiny_bert_dir, node_policy):
    """Every privacy switch at once over the wire: SecAgg+ (each message a fresh ClientApp process,
    so the protocol's state lives in the node's context between its five stages), client-level DP
    clipped on the nodes with an adaptive bound, FFA-LoRA, secure noise. One node insists on secure
    aggregation. Every institution signs its round keys and checks its neighbours' signatures, relayed
    by the coordinator through a real SuperLink, and signs the survivor list before it unmasks."""
    f = federation
    tmp, env = f["tmp"], f["env"]
    _enrol_and_start(f, tiny_bert_dir, node_policy, privacy={0: {"require_secure_aggregation": True,
                                                                 "require_secure_noise": True}}, identities=True)
    out = tmp / "run"
    scenario = _scenario(tmp, out, tiny_bert_dir, rounds=2, secure_aggregation=True, lora={"ffa": True},
                         privacy={"secure_mode": True,
                                  "client_level": {"enabled": True, "clipping": "client", "adaptive": True,
                                                   "noise_multiplier": 0.5}})
    run = _flwr_run(ROOT, scenario, env, tmp / "run.log")
    try:
        assert run.wait(timeout=400) == 0, (tmp / "run.log").read_text()[-3000:]
    finally:
        stop_process_tree(run)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert summary["privacy"]["noise_source"].startswith("OS CSPRNG")
    secure = summary["privacy"]["secure_aggregation"]["rounds"]
    assert sorted(secure) == ["1", "2"]
    for r in secure.values():
        assert len(r["contributors"]) == 3 and r["dropped"] == []
    cl = summary["privacy"]["client_level"]
    assert cl["clipping"] == "client" and len(cl["clipping_norms"]) == 2 and 0 < cl["epsilon"] < float("inf")
    for r in _rounds(out):
        assert r["errors"] == [] and len(r["clients"]) == 3
        assert all(c["bytes_up"] > c["bytes_down"] for c in r["clients"])  # masked 64-bit integers went up
    for i in range(3):  # each node paid for each round once, under its own ε cap
        ledger = Ledger(tmp / f"ledger-h{i}.json")
        spend = next(s for s in ledger.summary() if s.unit == "all-records")
        assert [e["round"] for e in ledger.entries(spend.unit)] == [1, 2] and spend.epsilon <= 3.0 + 1e-9
        held_out = next(s for s in ledger.summary() if s.unit == "held-out")  # each evaluation, a DP release
        assert held_out.rounds == 2 and 0 < held_out.epsilon <= 10.0
        others = sorted(f"'h{j}'" for j in range(3) if j != i)
        assert (tmp / f"h{i}.log").read_text().count(f"neighbours verified as [{', '.join(others)}]") == 2
        assert (tmp / f"h{i}.log").read_text().count("signed by 3 of 3 listed institutions") == 2  # consistency
        assert "fresh interpreter" not in (tmp / f"h{i}.log").read_text()  # every task forked by the preloader
    page = (out / "report.html").read_text()  # the coordinator's board page, finished: no more reloading
    assert "finished" in page and 'http-equiv="refresh"' not in page and "round 2 of 2" in page


def test_a_hostile_coordinator_cannot_reset_weaken_or_read_a_node_over_the_wire(federation, tiny_bert_dir,
                                                                               node_policy):
    """Real SuperLink and SuperNodes, and a bundle that attacks them: its ServerApp (tests/apps/hostile_server.py) sends
    an env interpolation, a non-private round, then an honest round that spends the nodes' budget,
    then another round with another split seed, held-out share and subset (the old ledger keyed by
    the split's hash gave a fresh budget), a δ of 0.4 and a fresh ledger path. Every attack is refused
    with its category only; each ledger holds the honest round alone; the node's environment never
    reaches a reply; the bundle's own ClientApp never runs on a node."""
    f = federation
    tmp, env = f["tmp"], f["env"]
    secret = "s3cret-value-of-the-node"
    env["FEDSLM_TEST_SECRET"] = secret  # in every SuperNode's (and so ClientApp's) environment
    _enrol_and_start(f, tiny_bert_dir, node_policy, names=("h0", "h1"))
    scenario = _scenario(tmp, tmp / "run", tiny_bert_dir, rounds=1, min_clients=2)
    # Its bundle also carries a ClientApp of its own (tests/apps/tampered_client.py) that would mark the
    # node's disk and reply with its environment: the nodes run their installed ClientApp, never this.
    mark = tmp / "tampered-client-ran"
    env["FEDSLM_TAMPER_MARK"] = str(mark)
    run = _flwr_run(_test_app(tmp, serverapp="hostile_server", clientapp="tampered_client"), scenario, env,
                    tmp / "run.log")
    try:
        assert run.wait(timeout=400) == 0, (tmp / "run.log").read_text()[-3000:]
    finally:
        stop_process_tree(run)
    replies = json.loads(scenario.with_suffix(".replies.json").read_text())
    assert secret not in json.dumps(replies)
    by_attack: dict[str, list] = {}
    for r in replies:
        by_attack.setdefault(r["attack"], []).append(r)
    expected = {"env-interpolation": "bad-request", "non-private": "refused-by-policy",
                "split-seed": "budget-exhausted"}
    for attack, category in expected.items():
        assert len(by_attack[attack]) == 2, attack
        for r in by_attack[attack]:
            assert r["error"]["reason"] == public_reason(category), (attack, r)
    assert all("metrics" in r and 0 < r["metrics"]["epsilon"] <= 3.0 + 1e-9 for r in by_attack["honest"])
    for i in range(2):
        (spend,) = Ledger(tmp / f"ledger-h{i}.json").summary()
        assert spend.rounds == 1 and spend.unit == "all-records"
    assert not Path("/tmp/fedslm-fresh-ledger.json").exists() and not Path("/tmp/fedslm-hostile-out").exists()
    assert not mark.exists() and all("leak" not in r for r in replies)
    for i in range(2):  # each node's log names the bundle it did not run
        assert "is not run; serving with this node's fedslm" in (tmp / f"h{i}.log").read_text()
