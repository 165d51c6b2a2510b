"""`fedslm simulate` on a real two-node Ray cluster (both nodes on this machine, each its own raylet
with one CPU), institutions placed on both nodes, as Ray's own state says."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from fedslm.simulation.simulate import free_port, simulate

RAY = Path(os.environ.get("VIRTUAL_ENV", Path(__file__).resolve().parents[1] / ".venv")) / "bin" / "ray"


def _ports(*names: str) -> list[str]:
    out = []
    for name in names:
        out += [f"--{name}", str(free_port())]
    return out


def _stop(session_dir: Path) -> None:
    """Every process of this cluster, by PID: those whose command line names its session folder."""
    mine = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(session_dir) in part for part in proc.info["cmdline"] or []):
                mine.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in mine:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(mine, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def ray_cluster(tmp_path):
    """A head node and a second node, each with 1 CPU and a resource naming it; stopped by PID."""
    temp = Path("/tmp") / f"fedslm-ray-{os.getpid()}-{tmp_path.name[-12:]}"  # Ray's socket paths must stay short
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus=1", "--disable-usage-stats", "--include-log-monitor=false"]
    try:
        subprocess.run([str(RAY), "start", "--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false",
                        "--resources={\"fedslm-head\": 1}", *common,
                        *_ports("ray-client-server-port", "node-manager-port", "object-manager-port",
                                "dashboard-agent-listen-port", "metrics-export-port", "runtime-env-agent-port")],
                       check=True, capture_output=True, env=env, timeout=120)
        subprocess.run([str(RAY), "start", f"--address=127.0.0.1:{port}", "--resources={\"fedslm-second\": 1}", *common,
                        *_ports("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                                "metrics-export-port", "runtime-env-agent-port")],
                       check=True, capture_output=True, env=env, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(temp)
        subprocess.run(["rm", "-rf", str(temp)], check=False)


def test_a_simulation_places_institutions_on_both_nodes_of_a_ray_cluster(cls_config, tmp_path, ray_cluster):
    import ray
    from ray._private import state

    out = tmp_path / "sim"
    cfg = cls_config("federation.num_clients=2", "federation.min_clients=2", "federation.rounds=1",
                     "federation.partitioner=iid", f"federation.ray_address={ray_cluster}", "federation.client_cpus=1",
                     f"output.dir={out}")
    summary = simulate(cfg)
    assert summary["rounds_completed"] == 1
    ray.init(address=ray_cluster, logging_level="ERROR", log_to_driver=False)
    try:
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        actors = [a for a in state.actors().values() if "ClientAppActor" in a.get("ActorClassName", "")]
    finally:
        ray.shutdown()
    assert len(nodes) == 2 and {"fedslm-head", "fedslm-second"} <= {k for r in nodes.values() for k in r}
    placed = {a["Address"]["NodeID"] for a in actors}
    assert placed == set(nodes), f"Flower's actors ran on {len(placed)} of the cluster's 2 nodes"
