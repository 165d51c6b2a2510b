"""A deployed node's SuperNode with adaptive waits (fedslm.node.supernode): an empty pull backs off from
10 ms to Flower's 3 s (to at most 0.16 s within 30 s of the last message), a pulled message restarts
the backoff and its reply is looked for every 20 ms; everything else is Flower's. `fedslm node start`
runs it unless FEDSLM_FLOWER_WAITS=1."""

from __future__ import annotations

import sys
import time

import pytest

from fedslm.node import runtime, supernode


def _waits():
    slept: list[float] = []
    return supernode.AdaptiveWaits(sleep=slept.append), slept


def test_empty_pulls_back_off_from_ten_ms_to_flowers_three_seconds():
    waits, slept = _waits()
    for _ in range(12):
        waits.sleep(3)
    assert slept[:3] == [0.01, 0.02, 0.04]
    assert all(b == min(2 * a, 3.0) for a, b in zip(slept, slept[1:]))
    assert slept[-1] == 3.0 and max(slept) == 3.0


def test_a_pulled_message_restarts_the_backoff_and_its_reply_is_awaited_in_short_steps():
    waits, slept = _waits()
    for _ in range(6):
        waits.sleep(3)
    waits.sleep(0.5)  # Flower's loop pulled a message and waits for its reply
    waits.sleep(0.5)
    waits.sleep(3)
    assert slept[6:] == [0.02, 0.02, 0.01]


def test_within_a_run_a_node_polls_at_least_every_active_cap_and_idle_ones_back_off_to_flowers():
    now = [100.0]
    slept: list[float] = []
    waits = supernode.AdaptiveWaits(sleep=slept.append, clock=lambda: now[0])
    waits.sleep(0.5)  # a message, at t = 100
    for _ in range(10):  # the next round's message is late: still at most ACTIVE_CAP apart
        waits.sleep(3)
    assert slept[1:] == [0.01, 0.02, 0.04, 0.08] + [supernode.ACTIVE_CAP] * 6
    now[0] += supernode.ACTIVE_WINDOW  # the run is over (or stalled): back to Flower's pace
    slept.clear()
    waits.sleep(3)
    assert slept == [3.0]


def test_every_other_wait_and_attribute_is_times_own():
    waits, slept = _waits()
    waits.sleep(1.25)
    waits.sleep(0.0)
    assert slept == [1.25, 0.0]
    assert waits.time is time.time and waits.monotonic is time.monotonic


def test_the_supernode_loop_gets_the_adaptive_waits_and_a_changed_flower_is_left_alone(monkeypatch):
    from flwr.supernode import start_client_internal

    monkeypatch.setattr(start_client_internal, "time", time)
    assert supernode.adapt_waits()
    assert isinstance(start_client_internal.time, supernode.AdaptiveWaits)
    assert not supernode.adapt_waits()  # already replaced (or another layout): nothing is replaced twice
    monkeypatch.delattr(start_client_internal, "time")
    assert not supernode.adapt_waits()


def test_fedslm_node_start_runs_the_adaptive_supernode_unless_told_to_keep_flowers(monkeypatch):
    args = ["--superlink", "127.0.0.1:9092", "--port", "9200"]
    monkeypatch.delenv(runtime.FLOWER_WAITS_ENV, raising=False)
    cmd, address = runtime.supernode_command(args)
    assert cmd[:4] == [sys.executable, "-P", "-m", "fedslm.node.supernode"] and cmd[4:] == [*args, "--isolation",
                                                                                          "process"]
    assert address == "127.0.0.1:9200"
    monkeypatch.setenv(runtime.FLOWER_WAITS_ENV, "1")
    cmd, _ = runtime.supernode_command(args)
    assert cmd[0].endswith("flower-supernode") and "fedslm.node.supernode" not in cmd
    with pytest.raises(ValueError, match="--isolation"):
        runtime.supernode_command([*args, "--isolation", "subprocess"])


def test_a_tasks_process_retries_a_missing_message_object_after_ten_ms_not_flowers_second(monkeypatch):
    from flwr.supernode.runtime import run_clientapp

    calls = []

    def pull(tree, fn, confirm, *, initial_backoff=1.0, backoff_cap=10.0):
        calls.append((initial_backoff, backoff_cap))

    monkeypatch.setattr(run_clientapp, "pull_and_inflate_object_from_tree", pull)
    assert supernode.quick_object_pulls()
    run_clientapp.pull_and_inflate_object_from_tree(None, None, None)
    assert calls == [(supernode.OBJECT_PULL_FIRST, 10.0)]
    assert not supernode.quick_object_pulls()  # once per process
    monkeypatch.delattr(run_clientapp, "pull_and_inflate_object_from_tree")
    assert not supernode.quick_object_pulls()  # another Flower layout: nothing changes
