"""A deployed node runs its own code: fedslm.node.app from this machine's fedslm, never the bundle's.

Flower's deployment ships the ClientApp's code in the app bundle (FAB) the coordinator pushes with
``flwr run``; a SuperNode in its default isolation installs that bundle and imports the ClientApp
from it. A bundle that is not ours would then skip every check this package makes. Flower 1.42's
answer, ``flower-supernode --trusted-entities``, verifies only bundles that come through Flower's
platform with a verification record: the SuperLink fills in ``fab.verifications`` only for a FAB it
fetched from there, so a locally built bundle (``flwr run .``, every deployment this project makes)
carries none and a SuperNode with trusted entities refuses all of them.

So a node is started with ``fedslm node start``, a ``flower-supernode --isolation process`` (with
adaptive waits instead of Flower's fixed 3 s after an empty pull: fedslm.node.supernode) with this
module as its task runner (what Flower's SuperExec does, for ClientApp tasks only):

- ``dispatch`` asks the SuperNode's Runtime API for ClientApp tasks and serves each in a process of
  its own, forked from a *preloader* started once with this machine's interpreter,
  ``python -P -m fedslm.node.runtime --preload`` (``-P``: no working directory on the path, so no
  ``clients/`` folder there can shadow the installed package). The preloader imports torch,
  transformers, PEFT, Opacus and fedslm's ClientApp and then only forks, one child per task: the child
  starts in milliseconds instead of the ~8 s those imports take on 2 cores, and still shares nothing
  with other tasks but read-only code (it never returns data to the preloader, which never sees a
  message). Should the preloader die, tasks fall back to one fresh interpreter each;
- ``serve_task`` pulls the task (message, context, run) as Flower's ``flwr-clientapp`` does, logs
  which bundle the coordinator sent, does not install or import it, answers with
  :data:`fedslm.node.app.app`, and pushes the reply and the context back.

The bundle's run config still arrives: it is part of the request, which the node plans through its
policy like any other untrusted input (fedslm.node.plan).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
import signal
from pathlib import Path
from typing import Callable, Optional, Sequence

log = logging.getLogger("fedslm.node")

# Set by `fedslm simulate` for the processes it starts (and by tests): this machine runs a simulation.
SIMULATION_ENV = "FEDSLM_SIMULATION"


def simulated() -> bool:
    """A simulation, by a signal no coordinator can send: fedslm's own flag in this process's
    environment, or running inside a Ray worker (the simulation engine's ClientApps do; a deployed
    SuperNode's never do)."""
    if os.environ.get(SIMULATION_ENV) == "1":
        return True
    ray = sys.modules.get("ray")
    return ray is not None and bool(ray.is_initialized())


# True in a process serve_task started: the ClientApp is this installation's, not a bundle's.
_SERVING = False


def serving() -> bool:
    """Whether this process is a task this node's runtime started (fedslm.node.app refuses otherwise,
    outside a simulation: a plain SuperNode runs whatever bundle it is sent)."""
    return _SERVING


TOKEN_ENV = "FEDSLM_TASK_TOKEN"


def task_command(runtime_api_address: str, parent_pid: Optional[int] = None) -> list[str]:
    """The process that serves one task: this interpreter, this installation, no working directory
    on its path. Its token goes in its environment (TOKEN_ENV), not on a command line ``ps`` shows."""
    cmd = [sys.executable, "-P", "-m", "fedslm.node.runtime", "--runtime-api-address", runtime_api_address]
    if parent_pid is not None:
        cmd += ["--parent-pid", str(parent_pid)]
    return cmd


# What every task imports: loaded once by the preloader, before it forks a task.
PRELOAD = ("torch", "transformers", "peft", "opacus", "fedslm.node.app", "fedslm.node.serve", "fedslm.train.local",
           "fedslm.train.prefix", "flwr.supernode.runtime.run_clientapp", "flwr.supercore.heartbeat")


def preloader(runtime_api_address: str, parent_pid: Optional[int]) -> int:
    """The preloader's loop: import PRELOAD, then for each task token read on stdin fork a child that
    serves it (stdout: the node's log; stdin: nothing) and answer ``done CODE`` on stdout when it ends."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    for line in sys.stdin:
        token = line.strip()
        if not token:
            continue
        pid = os.fork()
        if pid == 0:  # the task: a process of its own from here on
            code = 1
            try:
                os.dup2(2, 1)  # prints go to the node's log, never into the preloader's answers
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                code = serve_task(runtime_api_address, token, parent_pid)
            except BaseException:  # noqa: BLE001 - the child must never return into the preloader's loop
                log.exception("serving a task failed")
            finally:
                logging.shutdown()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(f"done {os.waitstatus_to_exitcode(status)}", flush=True)
    return 0


class _Preloaded:
    """The dispatcher's handle on the preloader: hand it a task, ask whether the task is done."""

    def __init__(self, runtime_api_address: str, parent_pid: int):
        self.proc = subprocess.Popen([*task_command(runtime_api_address, parent_pid), "--preload"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.busy = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _lines(self) -> list[str]:
        import select

        out = []
        while self.alive() and select.select([self.proc.stdout], [], [], 0)[0]:
            line = self.proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            out.append(line.strip())
        return out

    def done(self) -> bool:
        """Whether the task handed over has ended (True also when the preloader died with it)."""
        for line in self._lines():
            if line.startswith("done"):
                self.busy = False
        if not self.alive():
            self.busy = False
        return not self.busy

    def start(self, token: str) -> bool:
        if not self.alive():
            return False
        try:
            self.proc.stdin.write(token + "\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except (BrokenPipeError, OSError):
            return False
        self.busy = True
        return True

    def close(self) -> None:
        if self.alive():
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


# The first of dispatch's waits (and its step while a task runs): a local process and a local API, cheap to ask.
FIRST_POLL = 0.01


def dispatch(runtime_api_address: str, *, poll_interval: float = 0.2, parent_pid: Optional[int] = None,
             max_tasks: Optional[int] = None, alive: Callable[[], bool] = lambda: True) -> None:
    """Serve the SuperNode's ClientApp tasks while ``alive()`` (or until ``max_tasks`` were started)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    retry = make_simple_http_retry_invoker()
    # No backoff inside a call (Flower's waits grow to tens of seconds while the SuperNode starts):
    # this loop retries every half second and looks at alive() in between.
    retry.max_tries = 1
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=retry)
    running: list[subprocess.Popen] = []
    started = failures = 0
    forks: Optional[_Preloaded] = _Preloaded(runtime_api_address, os.getpid())
    log.info("serving ClientApp tasks from %s with fedslm.node.app of %s (bundles' code is never run)",
             runtime_api_address, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # Idle, the Runtime API is asked every FIRST_POLL s at first, then half as often after each empty answer,
    # down to poll_interval; a task (or one just finished: the next message may follow at once) starts over.
    idle = FIRST_POLL
    try:
        while (max_tasks is None or started < max_tasks) and alive():
            running = [p for p in running if p.poll() is None]
            if running or (forks is not None and not forks.done()):
                # one task at a time: a node's messages are served in turn, never a pile of processes
                time.sleep(FIRST_POLL)
                idle = FIRST_POLL
                continue
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
            except Exception as exc:  # noqa: BLE001 - the SuperNode is still starting, or restarting its API
                failures += 1
                if failures % 60 == 0:  # every ~30 s: a runtime that never connects must say so
                    log.warning("the SuperNode's Runtime API at %s still does not answer (%s)", runtime_api_address,
                                type(exc).__name__)
                time.sleep(0.5)
                continue
            failures = 0
            if res.HasField("task") and res.token:
                log.info("task %d of run %d: starting this node's ClientApp", res.task.task_id, res.task.run_id)
                if forks is not None and not forks.start(res.token):
                    log.warning("the preloader is gone (exit %s); each task now starts a fresh interpreter",
                                forks.proc.poll())
                    forks = None
                if forks is None:
                    running.append(subprocess.Popen(task_command(runtime_api_address, os.getpid()),
                                                    env={**os.environ, TOKEN_ENV: res.token}))
                started += 1
                idle = FIRST_POLL
            else:
                idle = min(2 * idle, poll_interval)
            running = [p for p in running if p.poll() is None]
            time.sleep(idle)
    finally:
        client.close()
        for proc in running:
            proc.wait()
        if forks is not None:
            while not forks.done():
                time.sleep(poll_interval)
            forks.close()


def serve_task(runtime_api_address: str, token: str, parent_pid: Optional[int] = None) -> int:
    """Serve one task with this node's ClientApp; the bundle is never installed or imported. Returns
    the process's exit status (0: a reply, honest refusals included, went back)."""
    global _SERVING  # noqa: PLW0603 - one task per process
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import SubStatus
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    if os.environ.get(FLOWER_WAITS_ENV) != "1":
        from fedslm.node.supernode import quick_object_pulls

        quick_object_pulls()  # the message's objects: a first retry after 10 ms, not Flower's 1 s

    from fedslm.wire.errors import NODE_REFUSED, public_reason

    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)], retry_invoker=retry)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = context = reply = None
    started = time.monotonic()
    status, details, code = SubStatus.FAILED, "ClientApp task failed", 1
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        log.info("run %d: the coordinator's bundle %r %r (sha256 %s) is not run; serving with this node's "
                 "fedslm", run.run_id, run.fab_id, run.fab_version, fab.hash_str)
        _SERVING = True
        from fedslm.node.app import app

        reply = app(message=message, context=context)
        status, details, code = SubStatus.COMPLETED, "", 0
    except Exception:  # noqa: BLE001 - the node's log has it all; the reply has a category only
        log.exception("serving a task failed")
        if message is not None:
            reply = Message(Error(code=NODE_REFUSED, reason=public_reason("internal")), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception:  # noqa: BLE001
            log.exception("could not push the reply to the SuperNode")
            code = 1
        retry.max_tries = 1
        push_task_output(client=client, context=context, sub_status=status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
        # The task's own time, from its input pulled to its output pushed (benchmarks/deployment.py reads it).
        log.info("task served in %.3f s (exit %d)", time.monotonic() - started, code)
    return code


def _option(args: Sequence[str], name: str, default: str) -> str:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


# Set to 1: `fedslm node start` runs the plain flower-supernode, with Flower's fixed 3 s and 0.5 s waits.
FLOWER_WAITS_ENV = "FEDSLM_FLOWER_WAITS"


def supernode_command(args: Sequence[str]) -> tuple[list[str], str]:
    """flower-supernode with ``args`` in process isolation, and the address of its Runtime API
    (its ``--host``/``--port``, Flower's defaults 127.0.0.1:9094 if not given)."""
    for arg in args:
        if arg == "--isolation" or arg.startswith("--isolation="):
            raise ValueError("fedslm node start sets --isolation process itself: the node's runtime serves "
                             "the ClientApp tasks; drop --isolation")
    address = f"{_option(args, '--host', '127.0.0.1')}:{_option(args, '--port', '9094')}"
    if os.environ.get(FLOWER_WAITS_ENV) == "1":  # Flower's own fixed waits (3 s on an empty pull)
        exe = Path(sys.executable).parent / "flower-supernode"
        return [str(exe) if exe.exists() else "flower-supernode", *args, "--isolation", "process"], address
    # The same SuperNode with adaptive waits (fedslm.node.supernode); -P: no working directory on the path.
    return [sys.executable, "-P", "-m", "fedslm.node.supernode", *args, "--isolation", "process"], address


def start_node(args: Sequence[str]) -> int:
    """``fedslm node start``: a SuperNode with ``args`` and this node's runtime as its task runner,
    until the SuperNode exits (its status is returned) or this process is stopped."""
    cmd, address = supernode_command(args)
    supernode = subprocess.Popen(cmd)

    def stop(signum, frame):  # noqa: ARG001
        supernode.terminate()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        dispatch(address, alive=lambda: supernode.poll() is None)
    finally:
        if supernode.poll() is None:
            supernode.terminate()
        code = supernode.wait()
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedslm.node.runtime",
                                     description="Serve one ClientApp task with this node's fedslm.")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--preload", action="store_true", help="be the preloader that forks one child per task")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.preload:
        return preloader(args.runtime_api_address, args.parent_pid)
    token = os.environ.pop(TOKEN_ENV, "")
    if not token:
        parser.error(f"no task token in ${TOKEN_ENV}; this process is started by `fedslm node start`")
    return serve_task(args.runtime_api_address, token, args.parent_pid)


if __name__ == "__main__":
    # Run as fedslm.node.runtime, not as __main__: fedslm.node.app asks that module whether it serves.
    from fedslm.node.runtime import main as _main

    sys.exit(_main())
