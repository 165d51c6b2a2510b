"""Waiting for replies without Flower's fixed poll interval.

Flower 1.42's grids push a round's messages and then pull replies in a loop with a fixed sleep
between pulls, and offer no knob for it: the deployment grid (``flwr.superlink.grid.http_grid.HttpGrid``,
what a ServerApp gets from a SuperLink) sleeps 3 s, the simulation's ``InMemoryGrid`` 0.1 s. A round is
a train and an evaluate exchange, so a deployed round costs at least 3 s, and often 6, whatever its
work. :class:`PollingGrid` wraps any grid and does the same push-then-pull with exponential backoff:
the first pulls a few milliseconds apart, doubling up to ``max_delay`` (0.1 s), back to the start
whenever replies arrive (the rest of a round's replies tend to follow soon). Its result is Flower's:
the replies that arrived, all of them or those in by ``timeout`` (partial at the deadline), and
``timeout=None`` waits until every message is answered. Everything else passes through, so it can sit
under fedslm's SecAgg+ grid (``fedslm.coordinator.secagg.SecureAggregationGrid``), which calls
``send_and_receive`` on the grid it wraps.

A pull is one request to the SuperLink; at the cap that is ten a second per ServerApp while nodes
train, which a SuperLink serves easily.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Optional

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_DELAY = 0.005
# Over the network: a ServerApp's pull is one small request to its SuperLink; ten a second while nodes train
# cost it little, and a round's replies are seen within 0.1 s of the last one.
MAX_DELAY = 0.1
# In a simulation the grid is Flower's InMemoryGrid, in the ServerApp's own process: a pull is a lookup in
# memory, and a round's work is tens of milliseconds, so even the network's cap would add its overshoot to every round.
IN_MEMORY_MAX_DELAY = 0.02


# How often a simulation's engine looks for the ServerApp's new messages (Flower's is every 0.1 s; see
# quicken_simulation_queue).
SIMULATION_QUEUE_POLL = 0.01


def polling_grid(grid: Any) -> "PollingGrid":
    """:class:`PollingGrid` around ``grid``, capped at IN_MEMORY_MAX_DELAY for Flower's in-memory grid (a
    simulation, whose message queue is then also polled faster: :func:`quicken_simulation_queue`) and at
    MAX_DELAY for any other (a SuperLink over the network)."""
    try:
        from flwr.superlink.grid.inmemory_grid import InMemoryGrid
    except ImportError:  # another Flower layout: the network's cap, never wrong, only slower
        InMemoryGrid = ()  # type: ignore[assignment,misc]  # noqa: N806
    if isinstance(grid, InMemoryGrid):
        return PollingGrid(grid, max_delay=IN_MEMORY_MAX_DELAY, simulation=True)
    return PollingGrid(grid, max_delay=MAX_DELAY)


def quicken_simulation_queue(poll: float = SIMULATION_QUEUE_POLL) -> bool:
    """Make Flower 1.42's simulation engine pick up new messages within ``poll`` seconds, not 0.1 s.

    Its ``add_messages_to_queue`` thread (flwr.server.superlink.fleet.vce.vce_api), in the ServerApp's own
    process, looks for messages and then waits ``f_stop.wait(0.1)`` on its stop event, with no setting for
    it: ~50 ms on average before each exchange reaches the institutions, about a quarter of a simulated
    round. That event's timed waits are capped at ``poll`` (an attribute on that one event object; a wait
    without a timeout, and setting it, are unchanged, so the engine still stops at once). Returns whether the
    thread was found; when Flower's layout differs, nothing changes (the engine's own 0.1 s)."""
    import threading

    for thread in threading.enumerate():
        target = getattr(thread, "_target", None)
        if getattr(target, "__name__", "") != "add_messages_to_queue":
            continue
        events = [a for a in getattr(thread, "_args", ()) if isinstance(a, threading.Event)]
        if len(events) != 1:
            return False
        event = events[0]
        if getattr(event, "_fedslm_poll", None) is None:
            wait = event.wait

            def capped(timeout: Optional[float] = None) -> bool:
                return wait(timeout if timeout is None else min(timeout, event._fedslm_poll))

            event.wait = capped  # type: ignore[method-assign]
        event._fedslm_poll = poll  # type: ignore[attr-defined]
        return True
    return False


class PollingGrid(Grid):
    """``grid`` with ``send_and_receive`` polling by exponential backoff; all else is ``grid``'s own."""

    def __init__(self, grid: Any, *, first_delay: float = FIRST_DELAY, max_delay: float = MAX_DELAY,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 simulation: bool = False):
        if not 0 < first_delay <= max_delay:
            raise ValueError(f"polling needs 0 < first_delay <= max_delay, got {first_delay} and {max_delay}")
        self.grid = grid
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._clock = clock
        self._sleep = sleep
        # Flower's in-memory grid: the ServerApp is a simulation's (fedslm.coordinator.warmup acts on it).
        self.simulation = simulation
        # A simulation: cap the engine's queue poll (quicken_simulation_queue) once its thread exists; Flower
        # starts it after Ray's actors, seconds after the ServerApp, so each exchange tries until it is found.
        self._quicken = simulation

    # Grid's abstract interface, delegated.
    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, content: Any, message_type: str, dst_node_id: int, group_id: str,
                       ttl: Optional[float] = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def __getattr__(self, name: str) -> Any:  # anything else a grid has (close, a private helper)
        if name == "grid":  # not set yet (copy, unpickling): never recurse
            raise AttributeError(name)
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> list[Message]:
        """Push ``messages``, then pull their replies until all are in or ``timeout`` seconds have passed."""
        if self._quicken:
            self._quicken = not quicken_simulation_queue()
        return self.receive(self.grid.push_messages(messages), timeout=timeout)

    def receive(self, message_ids: Iterable[str], *, timeout: Optional[float] = None) -> list[Message]:
        """Pull the replies to messages pushed earlier (``message_ids``) until all are in or ``timeout``
        seconds have passed."""
        pending = set(message_ids)
        deadline = None if timeout is None else self._clock() + timeout
        replies: list[Message] = []
        delay = self.first_delay
        while pending:
            got = list(self.grid.pull_messages(pending))
            if got:
                replies.extend(got)
                pending.difference_update(m.metadata.reply_to_message_id for m in got)
                delay = self.first_delay
                if not pending:
                    break
            wait = delay
            if deadline is not None:
                left = deadline - self._clock()
                if left <= 0:
                    break
                wait = min(wait, left)
            self._sleep(wait)
            if not got:
                delay = min(delay * 2, self.max_delay)
        return replies
