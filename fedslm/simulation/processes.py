"""The local Flower processes a simulation drives (fedslm.simulation.simulate): a SuperLink on a free port
with its own FLWR_HOME, the app bundle ``flwr run`` submits, and stopping every process they start, by PID,
whether the run ends, fails, is interrupted or gets SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from fedslm.config import Config
from fedslm.errors import FedslmError
from fedslm.simulation.preflight import check_client_gpus

CONNECTION = "fedslm"


class SimulationError(FedslmError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def project_dir() -> Path:
    """The folder holding fedslm's Flower app (pyproject.toml with [tool.flwr.app])."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text(encoding="utf-8"):
        raise SimulationError(
            f"fedslm simulate needs the fedslm project folder (pyproject.toml with [tool.flwr.app]); not found at {root}"
        )
    return root


def app_bundle(root: Path, dest: Path) -> Path:
    """The files of ``root``'s Flower app bundle, copied into ``dest`` (emptied first), for ``flwr run``.

    ``flwr run`` builds the bundle by walking and resolving every file under the folder it is given before
    it applies ``[tool.flwr.app] fab-include``; in the project folder that is the .venv's ~75,000 files
    (4-5 s of every simulation). The bundle holds only pyproject.toml and what fab-include names (the
    Flower apps and the bundled configs), so that is all ``dest`` gets: ``flwr run dest`` builds the same
    bundle. The apps import fedslm from the installed package, as they do from the project folder."""
    import fnmatch
    import shutil
    import tomllib

    pyproject = root / "pyproject.toml"
    try:
        meta = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SimulationError(f"cannot read the Flower app's {pyproject}: {exc}") from None
    patterns = meta.get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include")
    if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
        raise SimulationError(f"{pyproject}: [tool.flwr.app] fab-include must list the app's files (glob patterns)")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(pyproject, dest / "pyproject.toml")
    for name in (".gitignore", "LICENSE"):
        if (root / name).is_file():
            shutil.copy2(root / name, dest / name)
    for pattern in patterns:
        for path in sorted(root.glob(pattern)):
            rel = path.relative_to(root)
            if not path.is_file() or path.is_symlink() or fnmatch.fnmatch(path.name, "*.py[cod]"):
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / rel)
    return dest


def bin_path(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def ray_env(cfg: Config) -> dict[str, str]:
    """The environment that makes Flower's simulation join ``federation.ray_address``. Flower 1.42 keeps
    only num-cpus, num-gpus, logging-level and log-to-driver of ``options.backend.init-args`` and calls
    ``ray.init()`` without an address; ``ray.init()`` then connects to ``RAY_ADDRESS``."""
    return {"RAY_ADDRESS": cfg.federation.ray_address} if cfg.federation.ray_address else {}


def write_flower_config(flwr_home: Path, port: int, cfg: Config) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    ray_address = cfg.federation.ray_address
    # On this machine: a private Ray instance with this machine's CPUs. On a cluster (ray_address): join it
    # (through RAY_ADDRESS, see ray_env: Flower 1.42 drops an init-args address); Ray then schedules
    # institutions on every machine's CPUs, and may not be told how many there are.
    resources = "" if ray_address else f"options.backend.init-args.num-cpus = {cpus}\n"
    # Each institution's share of a GPU (Ray's num_gpus; 0.25: four share one); Ray then shows the actor its
    # GPU as cuda:0, where fedslm.train.device.simulation_device puts the model.
    gpus = check_client_gpus(cfg)
    if gpus:
        resources += f"options.backend.init-args.num-gpus = {gpus}\n"
    per_client = cfg.federation.client_cpus if ray_address else min(cfg.federation.client_cpus, cpus)
    (flwr_home / "config.toml").write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "127.0.0.1:{port}"\n'
        "insecure = true\n"
        f"options.num-supernodes = {cfg.federation.num_clients}\n"
        f"options.backend.client-resources.num-cpus = {per_client}\n"
        f"options.backend.client-resources.num-gpus = {float(cfg.federation.client_gpus):g}\n"
        f"{resources}"
        'options.backend.init-args.logging-level = "ERROR"\n'
        "options.backend.init-args.log-to-driver = false\n",
        encoding="utf-8",
    )


def _descendants(pid: int) -> list[Any]:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_process_tree(proc: subprocess.Popen, grace: float = 10.0, *, kill: bool = False) -> None:
    """Stop ``proc`` and everything it started (Ray workers included), by PID.

    ``proc`` leads its own session (start_new_session), so one signal reaches its group; helpers that
    detached into sessions of their own (flower-superexec) are found as descendants first. SIGTERM, then
    SIGKILL for what is left after ``grace`` seconds; with ``kill``, SIGKILL at once: for when what they were
    doing is done and only their own shutdown is left (Flower's simulation takes seconds to wind Ray down
    after the ServerApp returned; Ray's shared memory is unlinked as soon as it is mapped, so a killed Ray
    leaves nothing behind). Killed descendants are not waited for long: their parents were killed too, so
    they are not ours to reap."""
    import psutil

    procs = _descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill() if kill else p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=0.5 if kill else grace)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:  # ignored SIGTERM: it must not outlive us
        proc.kill()
        proc.wait(timeout=grace)


@contextlib.contextmanager
def local_superlink(flwr_home: Path, port: int, log_file: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """A SuperLink on ``port``, stopped (its whole process tree) on the way out. It boots in the background
    (several seconds): call :func:`wait_ready` before using it, and do other work meanwhile."""
    cmd = [bin_path("flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
           "--host", "127.0.0.1", "--port", str(port)]
    with log_file.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        stop_process_tree(proc)


def wait_ready(proc: subprocess.Popen, port: int, log_file: Path, timeout: float = 90) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SimulationError(f"flower-superlink exited with code {proc.returncode}; see {log_file}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).is_success:
                return
        if time.monotonic() > deadline:
            raise SimulationError(f"flower-superlink did not become ready in {timeout:.0f} s; see {log_file}")
        time.sleep(0.1)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (a scheduler's or `kill`'s stop) ends the simulation through its ``finally`` blocks, like
    Ctrl-C: by default it ends the process on the spot, and the SuperLink, Flower's simulation and Ray's
    processes outlive it. Exit status 143 (128 + SIGTERM), as if the signal had ended it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def unwind(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


