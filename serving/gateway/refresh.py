"""Keep the gateway's routing table current: poll a cheap revision, reload on change.

The request path never calls the source; this loop does, every `poll_interval_s`, and
reloads in full every `full_reload_s` anyway, in case a change slipped past the revision.
A failing source leaves the last good table in place. Once a second it also hands the
source the replicas that answered successfully (`report_successes`, where the source has
it): the offline sweep's evidence that a node whose heartbeats are late still serves,
and the API keys it admitted (each key's "last used" on the access page).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

from serving.gateway.routes import RouteTable, TableSource

logger = logging.getLogger("serving.gateway")


class SourceUnavailable(Exception):
    """The table source cannot answer for now (starting, overloaded, unreachable).

    Expected and retried, so logged as one line without a traceback; any other exception
    from a source is a bug and keeps its traceback.
    """


# What a source may raise while the portal or database starts or restarts.
TRANSIENT_ERRORS = (SourceUnavailable, TimeoutError, ConnectionError)


def log_source_failure(what: str, then: str, exc: BaseException) -> None:
    """Log "<what>: <reason>; <then>" as one WARNING line when `exc` is transient, else
    "<what>; <then>" at ERROR with the traceback."""
    if isinstance(exc, TRANSIENT_ERRORS):
        logger.warning("%s: %s; %s", what, str(exc) or type(exc).__name__, then)
    else:
        logger.error("%s; %s", what, then, exc_info=exc)


class TableRefresher:
    """Loads tables from a source and hands each new one to `apply`."""

    def __init__(self, source: TableSource, apply: Callable[[RouteTable], None],
                 clock: Callable[[], float] = time.monotonic, poll_interval_s: float = 0.2,
                 full_reload_s: float = 5.0,
                 take_successes: Callable[[], set[int]] | None = None,
                 report_interval_s: float = 1.0,
                 take_keys_used: Callable[[], dict[int, float]] | None = None) -> None:
        self._source = source
        self._apply = apply
        self._clock = clock
        self.poll_interval_s = poll_interval_s
        self.full_reload_s = full_reload_s
        self.revision: str | None = None
        self._loaded_at_s = -float("inf")
        self._take_successes = take_successes
        self._take_keys_used = take_keys_used
        self.report_interval_s = report_interval_s
        self._forced: asyncio.Task[None] | None = None
        self._forced_at_s = -float("inf")
        self._reported_at_s = -float("inf")

    async def load(self) -> None:
        """Load the whole table now and apply it."""
        # The revision is read first: a change during load() shows as a new revision next
        # time and costs one extra reload, never a missed change.
        revision = await self._source.revision()
        table = await self._source.load()
        self._apply(table)
        self.revision = revision
        self._loaded_at_s = self._clock()

    async def refresh_soon(self, min_interval_s: float = 0.2, wait_s: float = 1.0) -> None:
        """Poll now, at most once per `min_interval_s`: a request carried a key this table
        lacks, or found no replica, and either may have changed a moment ago. Concurrent
        callers share one poll and wait for it at most `wait_s` (a slow or frozen portal
        delays them that long, no more; the poll goes on); a failing source is ignored."""
        if self._forced is None or self._forced.done():
            if self._clock() - self._forced_at_s < min_interval_s:
                return
            self._forced_at_s = self._clock()
            self._forced = asyncio.get_running_loop().create_task(self._poll_quietly())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._forced), wait_s)

    async def _poll_quietly(self) -> None:
        try:
            await self.step()
        except Exception as exc:  # the regular loop logs the source's failures
            logger.debug("an early table poll failed: %s", exc)

    async def step(self) -> bool:
        """Poll once; return whether a new table was loaded."""
        if self._clock() - self._loaded_at_s >= self.full_reload_s:
            await self.load()
            return True
        if await self._source.revision() != self.revision:
            await self.load()
            return True
        return False

    async def report(self) -> bool:
        """Hand the source the replicas that succeeded and the API keys admitted since the
        last report ({key id: unix s}), at most once per `report_interval_s`; return
        whether a report was sent."""
        report: Any = getattr(self._source, "report_successes", None)
        if report is None or self._take_successes is None:
            return False
        if self._clock() - self._reported_at_s < self.report_interval_s:
            return False
        self._reported_at_s = self._clock()
        replica_ids = self._take_successes()
        keys_used_s = self._take_keys_used() if self._take_keys_used is not None else {}
        if not _takes_keys(report):  # a source that knows nothing of keys
            keys_used_s = {}
        if not replica_ids and not keys_used_s:
            return False
        successes = dict.fromkeys(replica_ids, time.time())
        if keys_used_s:
            await report(successes, keys_used_s=keys_used_s)
        else:
            await report(successes)
        return True

    async def run(self, failures: int = 0) -> None:
        """Poll until cancelled; errors are logged and retried at the next poll.

        `failures`: how many in a row the caller already logged (1 after a failed first
        load), so a source that is still starting is not reported twice.
        """
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.step()
                await self.report()
            except Exception as exc:
                failures += 1
                if failures % 100 == 1:  # the first of a streak, then every 20 s or so
                    log_source_failure(f"could not refresh the routing table ({failures} "
                                       "times)", "keeping the old one", exc)
            else:
                failures = 0


def _takes_keys(report: Callable[..., Any]) -> bool:
    """Whether a source's report_successes takes `keys_used_s` (older sources do not)."""
    try:
        return "keys_used_s" in inspect.signature(report).parameters
    except (TypeError, ValueError):
        return False
