"""One event-loop timer for the deadlines of every request in flight to the replicas.

A loop timer per request (`call_at` and its `cancel`) cost 2.7 % of the gateway's busy CPU
at concurrency 1 on a 2-core VM (py-spy, docs/benchmarks.md), more than admission or
balancing.
Deadlines are nearly always met, so the timer here is armed for the earliest deadline it
has been given and rarely moved: a request adds its deadline and removes it when answered,
two dict operations. When the timer fires, every request whose deadline has passed times
out, and the timer is armed again for the earliest one left. A deadline is enforced at
most `SLACK_S` early (loop timers fire up to a clock tick early) and never late.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

SLACK_S = 0.001  # a timer may fire this early; a deadline this close counts as passed


class Deadlines:
    """The deadlines of requests in flight on one event loop, each with its time-out action."""

    def __init__(self) -> None:
        self._pending: dict[object, tuple[float, Callable[[], None]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, loop: asyncio.AbstractEventLoop, key: object, deadline: float,
            time_out: Callable[[], None]) -> None:
        """Call `time_out()` at `deadline` (event-loop time, s) unless `discard(key)` is
        called first. One pending deadline per key: adding again replaces it."""
        if loop is not self._loop:  # a new event loop (tests; one pool serves one loop at a
            # time, and exchange refuses a connection of a closed loop): start afresh
            self._pending.clear()
            self._loop, self._timer, self._timer_at = loop, None, math.inf
        self._pending[key] = (deadline, time_out)
        if deadline < self._timer_at:
            self._arm(loop, deadline)

    def discard(self, key: object) -> None:
        """Forget `key`'s deadline (its request was answered or failed); no-op if unknown."""
        self._pending.pop(key, None)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = loop.call_at(when, self._fire), when

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        loop = self._loop
        if loop is None or not self._pending:
            return
        passed_s = loop.time() + SLACK_S
        due = [key for key, (deadline, _) in self._pending.items() if deadline <= passed_s]
        try:
            for key in due:
                entry = self._pending.pop(key, None)  # a time-out may discard another key
                if entry is not None:
                    entry[1]()
        finally:  # even if a time-out raised: the deadlines left must still be kept
            if self._pending:
                earliest = min(deadline for deadline, _ in self._pending.values())
                if earliest < self._timer_at:  # a time-out may have added a later one
                    self._arm(loop, earliest)
