"""A simulation's warm-up (fedslm.coordinator.warmup, fedslm.node.app's ``query.warmup``): the
institutions' processes import their round code while the ServerApp builds its model; a deployed node
refuses the query, and a coordinator outside a simulation never sends it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict

import fedslm.node.app as client_app
from fedslm.coordinator import warmup
from fedslm.coordinator.polling import PollingGrid
from fedslm.node import runtime
from fedslm.node.errors import public_reason

ROOT = Path(__file__).resolve().parent.parent


def _query(content: RecordDict | None = None) -> Message:
    return Message(content if content is not None else RecordDict(), dst_node_id=2,
                   message_type=warmup.MESSAGE_TYPE)


def _context(tmp_path) -> Context:
    # A policy path that does not exist: the warm-up must not read, plan or charge anything.
    return Context(run_id=1, node_id=2, node_config={"policy": str(tmp_path / "absent.yaml")}, state=RecordDict(),
                   run_config={})


def test_a_simulated_institution_answers_the_warmup_with_nothing(flower_identity, monkeypatch, tmp_path):
    monkeypatch.setenv(runtime.SIMULATION_ENV, "1")
    reply = client_app.app(_query(RecordDict({"c": ConfigRecord({"anything": "at all"})})), _context(tmp_path))
    assert not reply.has_error(), reply.error
    assert len(reply.content) == 0
    assert list(tmp_path.iterdir()) == []


def test_a_deployed_node_refuses_the_warmup(flower_identity, monkeypatch, tmp_path):
    monkeypatch.delenv(runtime.SIMULATION_ENV, raising=False)
    monkeypatch.setattr(runtime, "_SERVING", True)  # a process the node's own runtime started
    assert not runtime.simulated()
    reply = client_app.app(_query(), _context(tmp_path))
    assert reply.has_error() and reply.error.reason == public_reason("refused-by-policy")


class _Grid:
    """Flower's grid interface, in memory: nodes register after ``late`` lookups; ``answered`` reply."""

    def __init__(self, nodes, late=0, answered=None, failing=()):
        self.nodes, self.late, self.answered, self.failing = list(nodes), late, answered, set(failing)
        self.pushed: list[Message] = []
        self.lookups = 0

    def get_node_ids(self):
        self.lookups += 1
        return self.nodes if self.lookups > self.late else []

    def push_messages(self, messages):
        messages = list(messages)
        self.pushed.extend(messages)
        return [f"m{i}" for i in range(len(self.pushed) - len(messages), len(self.pushed))]

    def pull_messages(self, ids):
        out = []
        for mid in ids:
            node = self.nodes[int(mid[1:])]
            if self.answered is None or node in self.answered:
                reply = Message(RecordDict(), dst_node_id=0, message_type=warmup.MESSAGE_TYPE)
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                if node in self.failing:  # an error reply (Flower's Message keeps content or error)
                    reply.__dict__["_content"] = None
                    reply.__dict__["_error"] = Error(code=1, reason="refused")
                out.append(reply)
        return out


def test_a_coordinator_outside_a_simulation_sends_no_warmup():
    grid = _Grid([1, 2, 3])
    assert warmup.start(grid, simulation=False) == [] and grid.pushed == [] and grid.lookups == 0


def test_each_simulated_node_gets_one_empty_warmup_once_the_engine_has_registered_them(flower_identity):
    grid = _Grid([11, 12, 13], late=3)
    ids = warmup.start(grid, simulation=True)
    assert len(ids) == 3 and grid.lookups == 4
    assert [m.metadata.dst_node_id for m in grid.pushed] == [11, 12, 13]
    assert all(m.metadata.message_type == "query.warmup" and len(m.content) == 0 for m in grid.pushed)
    assert warmup.start(_Grid([]), simulation=True, nodes_wait=0.05) == []


def test_the_first_round_waits_for_the_warmup_replies_at_most_the_timeout(flower_identity):
    grid = _Grid([11, 12, 13])
    ids = warmup.start(grid, simulation=True)
    assert warmup.finish(PollingGrid(grid), ids, timeout=5) == 3
    silent = _Grid([11, 12, 13], answered={12})
    ids = warmup.start(silent, simulation=True)
    assert warmup.finish(PollingGrid(silent), ids, timeout=0.05) == 1


def test_a_warmup_answered_with_errors_is_logged_and_round_one_goes_ahead(flower_identity, caplog):
    grid = _Grid([11, 12, 13], failing={12, 13})
    ids = warmup.start(grid, simulation=True)
    with caplog.at_level("WARNING", logger="fedslm.coordinator"):
        assert warmup.finish(PollingGrid(grid), ids, timeout=5) == 3
    assert "2 of 3 institutions answered the warm-up with an error" in caplog.text


def test_the_serverapp_sends_its_warmup_before_it_imports_torch():
    """server/app.py imports Flower and fedslm's config only; torch and the coordinator come in main(),
    after the warm-up messages are out."""
    code = ("import sys, server.app; heavy = [m for m in ('torch', 'transformers', 'peft', 'opacus', "
            "'fedslm.coordinator.server') if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
