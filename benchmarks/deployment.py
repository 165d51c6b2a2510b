"""Framework time per round in deployment (issue 30, item 4): real processes on 127.0.0.1.

    python benchmarks/deployment.py [--rounds 8] [--records 600]

A SuperLink with TLS and SuperNode authentication, three institutions' nodes started as the README
starts them (``fedslm node start``, each with its policy and ``--records`` ICD-10 records of its own),
and ``flwr run`` of `make run`'s recipe (MiniLM, the DP head on cached vectors, FedAdam) for ``--rounds``
rounds, the held-out scores after the last. Twice, side by side: with fedslm's adaptive waits (the
default) and with Flower's fixed ones (``FEDSLM_FLOWER_WAITS=1``: the SuperNode sleeps 3 s after every
empty pull and looks for its reply every 0.5 s). Per round: the coordinator's round time, the slowest
node's task time (from its log: its ClientApp process pulling the message to pushing the reply, which
includes loading the base), and framework time = the first minus the second: what Flower, the
SuperNodes' and the coordinator's polling, the wire and aggregation cost. Round 1 and the last (which
also scores) are reported but not in the medians.

Writes benchmarks/results/speed_deployment.json and .md. Minutes; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCENARIO = ROOT / "simulations" / "icd10-hospitals.yaml"
BIN = Path(sys.executable).parent
NAMES = ("h0", "h1", "h2")
TARGET = 0.5


def _wait_healthy(port: int, ca: Path, proc: subprocess.Popen, seconds: float = 60) -> None:
    import ssl

    import httpx

    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"https://127.0.0.1:{port}/health", verify=ssl.create_default_context(cafile=str(ca)),
                         timeout=2).is_success:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the SuperLink did not start")
        time.sleep(0.2)


def _institution_files(tmp: Path, records: int) -> tuple[list[Path], list[str]]:
    """Each institution's CSV: ``records`` of the bundled ICD-10 training records, every third one."""
    from fedslm.config import load_config
    from fedslm.data import load_task_data

    cfg = load_config([SCENARIO])
    data = load_task_data(cfg.data, cfg.model.task)
    labels = list(cfg.data.labels)
    files = []
    for i, name in enumerate(NAMES):
        path = tmp / f"{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            for ex in data.train[i::3][:records]:
                writer.writerow([ex.text, labels[ex.label]])
        files.append(path)
    return files, labels


def federation(tmp: Path, rounds: int, records: int, flower_waits: bool) -> dict:
    import yaml

    from fedslm.deploy.certs import make_credentials
    from fedslm.simulation.processes import app_bundle, free_port, stop_process_tree

    tmp.mkdir(parents=True)
    creds = make_credentials(tmp / "creds", ["127.0.0.1"], list(NAMES))
    port = free_port()
    home = tmp / ".flwr"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "fed"\n[superlink.fed]\naddress = "127.0.0.1:{port}"\n'
                                      f'root-certificates = "{creds.ca_cert}"\n')
    env = {k: v for k, v in os.environ.items() if k != "FEDSLM_SIMULATION"}
    env.update({"FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
                "PATH": os.pathsep.join([str(BIN), env.get("PATH", "")])})
    if flower_waits:
        env["FEDSLM_FLOWER_WAITS"] = "1"
    files, labels = _institution_files(tmp, records)
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], log: str) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=open(tmp / log, "wb"), stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, stdin=subprocess.DEVNULL)
        procs.append(proc)
        return proc

    out = tmp / "run"
    try:
        link = start([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(creds.ca_cert), "--ssl-certfile",
                      str(creds.superlink_cert), "--ssl-keyfile", str(creds.superlink_key), "--enable-supernode-auth",
                      "--disable-runtime-dependency-installation", "--database", str(tmp / "superlink.db"),
                      "--host", "127.0.0.1", "--port", str(port)], "superlink.log")
        _wait_healthy(port, creds.ca_cert, link)
        for i, name in enumerate(NAMES):
            subprocess.run([str(BIN / "flwr"), "supernode", "register", str(creds.institutions[name][1]), "fed"],
                           env=env, check=True, capture_output=True, cwd=tmp)
            policy = tmp / f"{name}.policy.yaml"
            policy.write_text(yaml.safe_dump({
                "name": name,
                "data": {"source": str(files[i]), "labels": labels, "size_is_public": True},
                "privacy": {"ledger": str(tmp / f"{name}.ledger.json"), "max_epsilon": 8.0, "max_delta": 1e-3},
                "models": {"allowed": ["minilm"]}}), encoding="utf-8")
            start([str(BIN / "fedslm"), "node", "start", "--superlink", f"127.0.0.1:{port}", "--port",
                   str(free_port()), "--root-certificates", str(creds.ca_cert), "--auth-supernode-private-key",
                   str(creds.institutions[name][0]), "--node-config", f'institution={i} policy="{policy}"'],
                  f"{name}.log")
        # make run's recipe, for three institutions and ``rounds`` rounds, scored after the last.
        content = yaml.safe_load(SCENARIO.read_text(encoding="utf-8"))
        content["federation"].update(num_clients=3, min_clients=3, rounds=rounds, evaluate_every=rounds,
                                     round_timeout=300)
        content["output"] = {"dir": str(out)}
        scenario = tmp / "scenario.yaml"
        scenario.write_text(yaml.safe_dump(content), encoding="utf-8")
        app = app_bundle(ROOT, tmp / "app")
        started = time.monotonic()
        with open(tmp / "run.log", "wb") as log:
            run = subprocess.run([str(BIN / "flwr"), "run", str(app), "fed", "--stream", "--run-config",
                                  f"fedslm-config={json.dumps(str(scenario))}"],
                                 env=env, cwd=app, stdout=log, stderr=subprocess.STDOUT, timeout=1800)
        wall = time.monotonic() - started
        if run.returncode != 0 or not (out / "summary.json").exists():
            raise SystemExit(f"the deployed run failed:\n{(tmp / 'run.log').read_text()[-3000:]}")
    finally:
        for proc in reversed(procs):
            stop_process_tree(proc)
    # Deployed nodes do not report their training time; each node's log has its tasks' own times (input
    # pulled to output pushed): one train task a round, and one evaluate task in the last.
    tasks = [[float(m.group(1)) for m in re.finditer(r"task served in ([0-9.]+) s", (tmp / f"{n}.log").read_text())]
             for n in NAMES]
    rows = []
    for i, line in enumerate((out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()):
        r = json.loads(line)
        last = i == rounds - 1
        work = max((sum(t[i:i + 2]) if last else t[i]) if len(t) > i else 0.0 for t in tasks)
        rows.append({"round": r["round"], "round_seconds": r["round_seconds"], "node_task_seconds_max": work,
                     "framework_seconds": r["round_seconds"] - work, "institutions": len(r["clients"])})
    later = rows[1:-1] or rows  # not round 1 (each node computes its vectors) nor the last (it also scores)
    return {"wall_seconds": wall, "rounds": rows,
            "framework_seconds_median": statistics.median(r["framework_seconds"] for r in later),
            "round_seconds_median": statistics.median(r["round_seconds"] for r in later)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--records", type=int, default=600,
                    help="records per institution (a tenth held out: at least the policy's min_test_records, 50)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speed import machine  # noqa: E402 - the same machine line as speed.py

    result: dict = {"machine": machine(), "setup": (
        f"3 institutions on 127.0.0.1 (TLS, SuperNode authentication, `fedslm node start`), {args.records} ICD-10 "
        f"records each, make run's recipe for {args.rounds} rounds, held-out scores after the last; medians over "
        "rounds 2 to the one before the last")}
    with tempfile.TemporaryDirectory(prefix="fedslm-deploy-speed-") as tmp:
        for key, flower in (("adaptive", False), ("flower", True)):
            print(f"{'Flower' if flower else 'fedslm'}'s waits:", flush=True)
            res = federation(Path(tmp) / key, args.rounds, args.records, flower)
            result[key] = res
            secs = ", ".join(f"{r['round_seconds']:.2f}s" for r in res["rounds"])
            print(f"  rounds {secs}; framework per round (median) {res['framework_seconds_median']:.2f} s", flush=True)
    result["ratio"] = result["flower"]["framework_seconds_median"] / max(result["adaptive"]["framework_seconds_median"],
                                                                         1e-9)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speed_deployment.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    m = result["machine"]
    md = ["# Framework time per round in deployment (issue 30)", "",
          f"{m['when']}; {m['cpus']} CPUs, load average {', '.join(f'{x:.1f}' for x in m['load_average'])} at the start; "
          f"flwr {m['flwr']}. `python benchmarks/deployment.py` wrote this.", "", result["setup"] + ".", "",
          "| round | fedslm's waits: round s | slowest node's task s | framework s | Flower's waits: round s | "
          "slowest node's task s | framework s |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for a, f in zip(result["adaptive"]["rounds"], result["flower"]["rounds"]):
        md.append(f"| {a['round']} | {a['round_seconds']:.2f} | {a['node_task_seconds_max']:.2f} | "
                  f"{a['framework_seconds']:.2f} | {f['round_seconds']:.2f} | {f['node_task_seconds_max']:.2f} | "
                  f"{f['framework_seconds']:.2f} |")
    ad, fl = result["adaptive"]["framework_seconds_median"], result["flower"]["framework_seconds_median"]
    md += ["", f"Median framework time per round: **{ad:.2f} s** with fedslm's waits, {fl:.2f} s with Flower's "
           f"({result['ratio']:.1f}x); target ≤ {TARGET} s: {'met' if ad <= TARGET else 'not met'}.", ""]
    (RESULTS / "speed_deployment.md").write_text("\n".join(md), encoding="utf-8")
    print(f"wrote {RESULTS / 'speed_deployment.json'} and .md")


if __name__ == "__main__":
    main()
