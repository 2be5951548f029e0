"""serving/gateway/deadlines.py: one loop timer for every request's deadline."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, cast

import pytest

from serving.gateway.deadlines import SLACK_S, Deadlines


class Timer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class ManualLoop:
    """The two loop methods Deadlines uses, with time moved by hand."""

    def __init__(self) -> None:
        self.now_s = 100.0
        self.timers: list[Timer] = []

    def time(self) -> float:
        return self.now_s

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        self.timers.append(Timer(when, callback))
        return self.timers[-1]

    def armed(self) -> list[Timer]:
        return [timer for timer in self.timers if not timer.cancelled]

    def run_until(self, now_s: float) -> None:
        """Advance to `now_s`, firing (once each) the armed timers that are due."""
        self.now_s = now_s
        while due := [t for t in self.armed() if t.when <= now_s]:
            for timer in due:
                timer.cancelled = True
                timer.callback()


def loop_of(manual: ManualLoop) -> asyncio.AbstractEventLoop:
    return cast(asyncio.AbstractEventLoop, manual)


def test_each_request_times_out_at_its_own_deadline_with_one_timer_armed() -> None:
    manual, deadlines, timed_out = ManualLoop(), Deadlines(), []
    for key, deadline in (("a", 101.0), ("b", 101.5), ("c", 102.0)):
        deadlines.add(loop_of(manual), key, deadline, lambda key=key: timed_out.append(key))
    assert len(manual.armed()) == 1 and manual.armed()[0].when == 101.0
    manual.run_until(101.2)
    assert timed_out == ["a"]
    assert [timer.when for timer in manual.armed()] == [101.5]  # re-armed for the next
    manual.run_until(103.0)
    assert timed_out == ["a", "b", "c"] and len(deadlines) == 0 and not manual.armed()


def test_an_answered_request_never_times_out() -> None:
    manual, deadlines, timed_out = ManualLoop(), Deadlines(), []
    deadlines.add(loop_of(manual), "a", 101.0, lambda: timed_out.append("a"))
    deadlines.add(loop_of(manual), "b", 102.0, lambda: timed_out.append("b"))
    deadlines.discard("a")
    deadlines.discard("never-added")
    manual.run_until(101.5)
    assert timed_out == []
    manual.run_until(102.0)
    assert timed_out == ["b"]


def test_an_earlier_deadline_moves_the_timer_and_a_later_one_does_not() -> None:
    manual, deadlines = ManualLoop(), Deadlines()
    deadlines.add(loop_of(manual), "a", 105.0, lambda: None)
    deadlines.add(loop_of(manual), "b", 110.0, lambda: None)
    assert [timer.when for timer in manual.armed()] == [105.0]
    deadlines.add(loop_of(manual), "c", 101.0, lambda: None)
    assert [timer.when for timer in manual.armed()] == [101.0]


def test_a_timer_that_fires_a_little_early_still_times_out_what_is_due() -> None:
    manual, deadlines, timed_out = ManualLoop(), Deadlines(), []
    deadlines.add(loop_of(manual), "a", 101.0, lambda: timed_out.append("a"))
    manual.now_s = 101.0 - SLACK_S / 2  # the loop's clock tick: the timer fires early
    manual.armed()[0].callback()
    assert timed_out == ["a"]


def test_a_deadline_far_from_passed_waits_when_the_timer_fires_for_an_answered_one() -> None:
    manual, deadlines, timed_out = ManualLoop(), Deadlines(), []
    deadlines.add(loop_of(manual), "a", 101.0, lambda: timed_out.append("a"))
    deadlines.add(loop_of(manual), "b", 104.0, lambda: timed_out.append("b"))
    deadlines.discard("a")
    manual.run_until(101.0)  # a's timer fires with only b left, not due
    assert timed_out == [] and [timer.when for timer in manual.armed()] == [104.0]


def test_a_new_event_loop_starts_afresh() -> None:
    first, second, deadlines, timed_out = ManualLoop(), ManualLoop(), Deadlines(), []
    deadlines.add(loop_of(first), "a", 101.0, lambda: timed_out.append("a"))
    deadlines.add(loop_of(second), "b", 109.0, lambda: timed_out.append("b"))
    assert len(deadlines) == 1
    assert [timer.when for timer in second.armed()] == [109.0]
    second.run_until(109.0)
    assert timed_out == ["b"]


async def test_on_a_real_loop_a_deadline_times_out_its_request() -> None:
    loop, deadlines = asyncio.get_running_loop(), Deadlines()
    fired: asyncio.Future[Any] = loop.create_future()
    deadlines.add(loop, "a", loop.time() + 0.02, lambda: fired.set_result(loop.time()))
    started_s = loop.time()
    assert await asyncio.wait_for(fired, timeout=5.0) >= started_s + 0.02 - SLACK_S


def test_a_time_out_that_raises_leaves_the_other_deadlines_kept() -> None:
    manual, deadlines, timed_out = ManualLoop(), Deadlines(), []

    def broken() -> None:
        raise RuntimeError("a bug in one time-out")

    deadlines.add(loop_of(manual), "a", 101.0, broken)
    deadlines.add(loop_of(manual), "b", 105.0, lambda: timed_out.append("b"))
    with pytest.raises(RuntimeError):
        manual.run_until(101.0)
    assert [timer.when for timer in manual.armed()] == [105.0]
    manual.run_until(105.0)
    assert timed_out == ["b"]


def test_a_time_out_may_discard_another_due_request() -> None:
    manual, deadlines, timed_out = ManualLoop(), Deadlines(), []
    deadlines.add(loop_of(manual), "a", 101.0,
                  lambda: (timed_out.append("a"), deadlines.discard("b")))
    deadlines.add(loop_of(manual), "b", 101.0, lambda: timed_out.append("b"))
    manual.run_until(101.0)
    assert timed_out == ["a"] and len(deadlines) == 0


def test_the_core_finds_each_threads_own_running_loop() -> None:
    from serving.gateway.core import GatewayCore
    from tests.gateway_helpers import MemoryTableSource, table

    core = GatewayCore(MemoryTableSource(table()))
    seen: dict[str, tuple[object, object]] = {}
    started, looked = threading.Barrier(2), threading.Barrier(2)

    def run(name: str) -> None:
        async def look() -> None:
            started.wait(5)
            seen[name] = (core._running_loop(), asyncio.get_running_loop())
            looked.wait(5)  # each loop still runs while the other thread looks
            seen[name + " again"] = (core._running_loop(), asyncio.get_running_loop())

        asyncio.run(look())

    threads = [threading.Thread(target=run, args=(name,)) for name in ("one", "two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(seen) == 4
    assert all(found is running for found, running in seen.values())


def test_a_time_out_that_adds_a_later_deadline_keeps_the_earlier_ones_on_time() -> None:
    manual, deadlines, timed_out = ManualLoop(), Deadlines(), []
    deadlines.add(loop_of(manual), "a", 101.0, lambda: deadlines.add(
        loop_of(manual), "late", 200.0, lambda: timed_out.append("late")))
    deadlines.add(loop_of(manual), "b", 102.0, lambda: timed_out.append("b"))
    manual.run_until(101.0)
    assert min(timer.when for timer in manual.armed()) == 102.0
    manual.run_until(102.0)
    assert timed_out == ["b"]
