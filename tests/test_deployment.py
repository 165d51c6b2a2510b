"""Deployment with real processes on 127.0.0.1: a SuperLink with TLS and SuperNode authentication,
three enrolled SuperNodes, `flwr run` of the same apps; strangers and plain text are refused.
Every process is stopped by PID (with its descendants) in teardown, also on failure."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fedslm.deploy.certs import make_credentials
from fedslm.federation.simulate import free_port, stop_process_tree
from fedslm.privacy import Ledger

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
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
           "FLWR_DISABLE_UPDATE_CHECK": "1"}
    procs: list[subprocess.Popen] = []

    def start(cmd, log):
        proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, stdin=subprocess.DEVNULL)
        procs.append(proc)
        return proc

    def supernode(key, name, node_config="", insecure=False, retries=None):
        cmd = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--port", str(free_port())]
        cmd += ["--insecure"] if insecure else ["--root-certificates", str(creds.ca_cert)]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        if node_config:
            cmd += ["--node-config", node_config]
        if retries is not None:
            cmd += ["--max-retries", str(retries), "--max-wait-time", "15"]
        return start(cmd, tmp_path / f"{name}.log")

    try:
        start([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(creds.ca_cert), "--ssl-certfile",
               str(creds.superlink_cert), "--ssl-keyfile", str(creds.superlink_key), "--enable-supernode-auth",
               "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)],
              tmp_path / "superlink.log")
        deadline = time.monotonic() + 60
        while True:
            try:
                ctx = ssl.create_default_context(cafile=str(creds.ca_cert))
                if httpx.get(f"https://127.0.0.1:{port}/health", verify=ctx, timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "superlink.log").read_text()[-2000:]
            time.sleep(0.5)
        yield {"creds": creds, "stranger": stranger, "env": env, "port": port, "supernode": supernode,
               "tmp": tmp_path}
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


def test_secure_federation_runs_and_strangers_are_refused(federation, tiny_bert_dir):
    f = federation
    tmp, env = f["tmp"], f["env"]
    for name in ("h0", "h1", "h2"):  # the coordinator enrols each institution's public key
        subprocess.run([str(BIN / "flwr"), "supernode", "register", str(f["creds"].institutions[name][1]), "fed"],
                       env=env, check=True, capture_output=True, cwd=tmp)
    files = _write_institution_files(tmp)
    for i, path in enumerate(files):
        f["supernode"](f["creds"].institutions[f"h{i}"][0], f"h{i}",
                       f'institution={i} name="h{i}" data-source="{path}" ledger="{tmp / f"ledger-h{i}.json"}"')
    # Meanwhile, a node whose key was never enrolled, and a plain-text node, try to join.
    stranger = f["supernode"](f["stranger"], "stranger", retries=1)
    plain = f["supernode"](None, "plain", insecure=True, retries=1)
    out = tmp / "run"
    scenario = tmp / "scenario.yaml"
    scenario.write_text(json.dumps({
        "model": {"name": str(tiny_bert_dir), "max_length": 16},
        "lora": {"r": 2, "alpha": 4},
        "data": {"labels": sorted(CLASS_WORDS)},
        "privacy": {"target_epsilon": 3.0},
        "train": {"batch_size": 8, "physical_batch_size": 8, "local_steps": 2},
        "federation": {"num_clients": 3, "min_clients": 3, "rounds": 2},
        "output": {"dir": str(out)},
    }))
    run = subprocess.run([str(BIN / "flwr"), "run", str(ROOT), "fed", "--stream", "--run-config",
                          f"fedslm-config={json.dumps(str(scenario))}"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert (out / "summary.json").exists(), run.stdout[-3000:] + run.stderr[-2000:]
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [len(r["clients"]) for r in rounds] == [3, 3]
    assert sorted(c["institution"] for c in rounds[-1]["clients"]) == [0, 1, 2]
    for i in range(3):  # each node's own ledger, where its node config put it, holds both rounds
        spend = Ledger(tmp / f"ledger-h{i}.json").summary()
        assert len(spend) == 1 and spend[0].rounds == 2 and 0 < spend[0].epsilon <= 3.0 + 1e-9

    # The stranger is refused and gives up; the plain-text node gets no connection to the TLS SuperLink.
    assert stranger.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in (tmp / "stranger.log").read_text()
    assert plain.wait(timeout=120) != 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{f['port']}/health", timeout=3)


def test_killed_node_round_completes_and_restarted_node_keeps_its_ledger(federation, tiny_bert_dir):
    import psutil

    f = federation
    tmp, env = f["tmp"], f["env"]
    for name in ("h0", "h1", "h2"):
        subprocess.run([str(BIN / "flwr"), "supernode", "register", str(f["creds"].institutions[name][1]), "fed"],
                       env=env, check=True, capture_output=True, cwd=tmp)
    files = _write_institution_files(tmp)
    configs = [f'institution={i} name="h{i}" data-source="{p}" ledger="{tmp / f"ledger-h{i}.json"}"'
               for i, p in enumerate(files)]
    nodes = [f["supernode"](f["creds"].institutions[f"h{i}"][0], f"h{i}", configs[i]) for i in range(3)]
    out = tmp / "run"
    scenario = tmp / "scenario.yaml"
    scenario.write_text(json.dumps({
        "model": {"name": str(tiny_bert_dir), "max_length": 16}, "lora": {"r": 2, "alpha": 4},
        "data": {"labels": sorted(CLASS_WORDS)}, "privacy": {"target_epsilon": 3.0},
        "train": {"batch_size": 8, "physical_batch_size": 8, "local_steps": 2},
        "federation": {"num_clients": 3, "min_clients": 2, "rounds": 4, "round_timeout": 180},
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
    entries = ledger.entries(later.dataset_id)
    assert entries[0]["round"] == 1 and entries[-1]["round"] == 4
    assert later.epsilon > after_round1.epsilon and later.steps == after_round1.steps * len(entries)
    eps_reported = next(c["epsilon"] for c in rounds[-1]["clients"] if c["institution"] == 2)
    assert eps_reported == pytest.approx(later.epsilon)
