"""``flower-supernode`` with its fixed waits made adaptive: what ``fedslm node start`` runs.

Flower 1.42's SuperNode (``flwr.supernode.start_client_internal``) pulls the SuperLink for a message
and, when there is none, sleeps a fixed 3 s; after pulling one, it waits for the ClientApp's reply
in steps of 0.5 s. Neither has a setting. So every exchange of a deployed round waits 1.5 s on
average (up to 3 s) before the node even sees its message, and 0.25 s more before its reply leaves,
whatever the work: with the coordinator's own polling fixed (fedslm.coordinator.polling), this was
most of a deployed round's framework time.

Here the same SuperNode runs with ``time`` in that one module replaced by :class:`AdaptiveWaits`:
an empty pull waits 10 ms, then twice as long after each further empty pull, up to Flower's 3 s; a
pulled message starts the schedule again, and its reply is looked for every 20 ms. Within 30 s of its
last message a node is in a run (the next round's message comes once the slowest institution has
answered): there it waits at most 0.16 s between pulls; a node idle for longer polls the SuperLink as
rarely as Flower's own. Every other wait, and everything else the module does, is Flower's. Only
waits of exactly Flower's two values are changed; a Flower whose module differs (no ``time`` there)
runs unchanged.
"""

from __future__ import annotations

import sys
import time as _time
from typing import Any, Callable

EMPTY_PULL = 3.0  # Flower's sleep after a pull that found no message
REPLY_POLL = 0.5  # Flower's sleep while the ClientApp's reply is not there yet
FIRST = 0.01
REPLY_STEP = 0.02
# Within ACTIVE_WINDOW seconds of the last message, empty pulls wait at most ACTIVE_CAP (about six pulls a
# second per node while a round runs).
ACTIVE_WINDOW = 30.0
ACTIVE_CAP = 0.16


class AdaptiveWaits:
    """A stand-in for the ``time`` module of Flower's SuperNode loop: ``sleep(3)`` backs off from
    ``first`` to ``cap`` over consecutive empty pulls (to at most ``active_cap`` within ``active_window`` s
    of the last message), ``sleep(0.5)`` (a message was pulled and its reply is awaited) sleeps
    ``reply_step`` and restarts the backoff; all else is ``time``'s."""

    def __init__(self, first: float = FIRST, cap: float = EMPTY_PULL, reply_step: float = REPLY_STEP,
                 active_window: float = ACTIVE_WINDOW, active_cap: float = ACTIVE_CAP,
                 sleep: Callable[[float], None] = _time.sleep, clock: Callable[[], float] = _time.monotonic):
        self.first, self.cap, self.reply_step = first, cap, reply_step
        self.active_window, self.active_cap = active_window, active_cap
        self.delay = first
        self.last_message = -float("inf")
        self._sleep, self._clock = sleep, clock

    def sleep(self, seconds: float) -> None:
        if seconds == EMPTY_PULL:
            wait, self.delay = self.delay, min(self.delay * 2, self.cap)
            if self._clock() - self.last_message < self.active_window:
                wait = min(wait, self.active_cap)
        elif seconds == REPLY_POLL:
            wait, self.delay = min(self.reply_step, seconds), self.first
            self.last_message = self._clock()
        else:
            wait = seconds
        self._sleep(wait)

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)


def adapt_waits() -> bool:
    """Install :class:`AdaptiveWaits` in Flower's SuperNode loop; returns whether that module has one to
    replace."""
    from flwr.supernode import start_client_internal

    if getattr(start_client_internal, "time", None) is not _time:
        return False
    start_client_internal.time = AdaptiveWaits()  # type: ignore[attr-defined]
    return True


OBJECT_PULL_FIRST = 0.01


def quick_object_pulls() -> bool:
    """In a ClientApp task's process: retry a message object its SuperNode does not hold yet after 10 ms,
    doubling (Flower's cap of 10 s stays), instead of Flower's first retry after 1 s.

    The SuperNode offers the task as soon as it has stored the message, while it still fetches the
    message's objects (the adapter's tensors) from the SuperLink; Flower's ClientApp process asks for them
    at once, and one that is not there yet is asked for again after ``PULL_INITIAL_BACKOFF`` = 1 s: most
    exchanges paid that second. The task asks its own SuperNode on this machine, so a short first retry
    costs nothing. Returns whether Flower's pull was found (when its layout differs, nothing changes)."""
    import functools

    from flwr.supernode.runtime import run_clientapp

    pull = getattr(run_clientapp, "pull_and_inflate_object_from_tree", None)
    if pull is None or getattr(pull, "_fedslm_quick", False):
        return False
    quick = functools.partial(pull, initial_backoff=OBJECT_PULL_FIRST)
    quick._fedslm_quick = True  # type: ignore[attr-defined]
    run_clientapp.pull_and_inflate_object_from_tree = quick  # type: ignore[attr-defined]
    return True


def main() -> None:
    """``python -m fedslm.node.supernode <flower-supernode arguments>``."""
    from flwr.supernode.cli import flower_supernode

    adapt_waits()
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
