"""Send one inference request to a replica: lease, queue, retry elsewhere, release.

Every lease taken here is released exactly once, with the outcome the balancer needs:
SUCCESS for any answer but 502/503, FAILURE for those and for connection errors (then the
next attempt goes to a replica not yet tried), TIMEOUT when the request's deadline passes
(504, no retry: the time is spent), CANCELLED when the client goes away. A streamed
answer (`stream=True`: generate_stream) keeps its lease until the stream ends
(streaming.py settles it), so the balancer's outstanding count is the running sequences.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from serving.balancing import Lease, Outcome, Unavailable
from serving.gateway.deployments import DeploymentRuntime
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.responses import Headers, Response, error, relayed, retry_later
from serving.gateway.streaming import StreamEnd, StreamingResponse, StreamSummary
from serving.gateway.upstream import UpstreamError, UpstreamPool, UpstreamResponse
from serving.gateway.upstream_stream import UpstreamStream, open_stream

RETRY_AFTER_S = 1
QUEUE_FULL = "queue_full"  # no lease: the wait queue was full or the wait timed out
_RETRYABLE_STATUSES = frozenset({502, 503})
_LEASE_OUTCOMES = {StreamEnd.COMPLETE: Outcome.SUCCESS, StreamEnd.BROKEN: Outcome.FAILURE,
                   StreamEnd.TIMEOUT: Outcome.TIMEOUT, StreamEnd.CLIENT_GONE: Outcome.CANCELLED}


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 0.4 us more per request
class UpstreamRequest:
    """What goes to the replica: method, path and query, chosen headers, body."""

    method: bytes
    target: bytes
    headers: Headers
    body: bytes
    affinity: bytes | None = None  # the prompt's prefix key (serving/affinity.py), if on


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 0.4 us more per request
class _Retry:
    """An attempt that failed on its replica; the next one goes elsewhere."""

    response: UpstreamResponse | None  # the replica's 502/503, if it answered at all


class Forwarder:
    """Runs the attempts of one request until an answer, a timeout, or nothing left to try."""

    def __init__(self, pool: UpstreamPool, metrics: GatewayMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self._metrics = metrics
        self._clock = clock
        # Replicas that answered since the refresher last took them: the offline sweep's
        # evidence that a node whose heartbeats are late still serves. Only ids from the
        # routing table go in, so it is bounded by the table, never by clients.
        self.succeeded: set[int] = set()

    async def forward(self, runtime: DeploymentRuntime, version: int,
                      request: UpstreamRequest, deadline: float, stream: bool = False,
                      ) -> Response | StreamingResponse:
        """Return the answer for the client; `deadline` is in event-loop time (with
        `stream`: until the replica's head; a streamed answer relays the body as it
        comes, see streaming.py)."""
        tried: frozenset[int] = frozenset()
        last: UpstreamResponse | None = None
        for attempt in range(max(1, runtime.route.max_attempts)):
            lease: Lease | Unavailable | str = runtime.choose(self._clock(), tried, version,
                                                              request.affinity)
            if lease is Unavailable.AT_CAPACITY:
                lease = await self._wait_for_lease(runtime, version, tried, deadline,
                                                   request.affinity)
            if not isinstance(lease, Lease):
                return self._unavailable(runtime, version, lease, last)
            if attempt:
                self._metrics.retried(runtime.name)
            result = await self._attempt(runtime, lease, request, deadline, stream)
            if not isinstance(result, _Retry):
                return result
            tried = tried | {lease.replica_id}
            last = result.response
        if last is not None:
            return relayed(last.status, last.headers, last.body)
        return self._refuse(runtime, "no replica could serve the request")

    async def _wait_for_lease(self, runtime: DeploymentRuntime, version: int,
                              tried: frozenset[int], deadline: float,
                              affinity: bytes | None) -> Lease | Unavailable | str:
        """Queue until a replica has room; QUEUE_FULL when full or after the queue timeout."""
        route = runtime.route
        loop = asyncio.get_running_loop()
        queue_deadline = min(deadline, loop.time() + route.queue_timeout_s)
        while True:
            timeout_s = queue_deadline - loop.time()
            if not await runtime.waiting.wait(version, route.queue_limit, timeout_s):
                return QUEUE_FULL
            lease = runtime.choose(self._clock(), tried, version, affinity)
            if lease is not Unavailable.AT_CAPACITY:
                return lease

    async def _attempt(self, runtime: DeploymentRuntime, lease: Lease,
                       request: UpstreamRequest, deadline: float, stream: bool,
                       ) -> Response | StreamingResponse | _Retry:
        target = runtime.targets.get(lease.replica_id)
        started_s = self._clock()
        if target is None:  # cannot happen: choose and this lookup share one loop step
            self._release(runtime, lease, Outcome.FAILURE, started_s)
            return _Retry(None)
        response: UpstreamResponse | UpstreamStream
        try:
            if stream:
                response = await open_stream(
                    self._pool, target.host, target.port, request.method, request.target,
                    [*request.headers, target.authorization], request.body, deadline,
                    target.tls)
            else:
                response = await self._pool.request(
                    target.host, target.port, request.method, request.target,
                    [*request.headers, target.authorization], request.body, deadline,
                    target.tls)
        except TimeoutError:
            self._release(runtime, lease, Outcome.TIMEOUT, started_s)
            return error(504, f"{runtime.name}: the replica did not answer within "
                              f"{runtime.route.request_timeout_s:g} s")
        except UpstreamError:
            self._release(runtime, lease, Outcome.FAILURE, started_s)
            return _Retry(None)
        except BaseException:
            self._release(runtime, lease, Outcome.CANCELLED, started_s)
            raise
        if isinstance(response, UpstreamStream):
            return self._relay(runtime, lease, response, started_s)
        if response.status in _RETRYABLE_STATUSES:
            self._release(runtime, lease, Outcome.FAILURE, started_s)
            return _Retry(response)
        self._release(runtime, lease, Outcome.SUCCESS, started_s)
        self.succeeded.add(lease.replica_id)
        return relayed(response.status, response.headers, response.body)

    def _relay(self, runtime: DeploymentRuntime, lease: Lease, upstream: UpstreamStream,
               started_s: float) -> StreamingResponse:
        """Return the client's stream; its end releases the lease. The balancer's latency
        sample is the time to the replica's head (its queue and prefill: what tells a
        loaded replica from an idle one), not the stream's length, which the client sets."""
        self.succeeded.add(lease.replica_id)
        head_s = self._clock() - started_s
        response = StreamingResponse(upstream.status, upstream.headers, upstream,
                                     runtime.route.request_timeout_s, self._clock)

        def settle(summary: StreamSummary) -> None:
            if runtime.release(lease, _LEASE_OUTCOMES[summary.outcome], head_s, self._clock()):
                self._metrics.ejected(runtime.name)

        response.on_end.append(settle)
        return response

    def _release(self, runtime: DeploymentRuntime, lease: Lease, outcome: Outcome,
                 started_s: float) -> None:
        now_s = self._clock()
        if runtime.release(lease, outcome, now_s - started_s, now_s):
            self._metrics.ejected(runtime.name)

    def _unavailable(self, runtime: DeploymentRuntime, version: int,
                     reason: Unavailable | str, last: UpstreamResponse | None) -> Response:
        if last is not None:  # the replicas answered 502/503: their answer says more
            return relayed(last.status, last.headers, last.body)
        if reason == QUEUE_FULL:
            return self._refuse(runtime, f"every replica of {runtime.name!r} is busy")
        if reason is Unavailable.ALL_TRIED:
            return self._refuse(runtime, "no replica could serve the request")
        return self._refuse(runtime, f"no ready replica of {runtime.name!r} version {version}")

    def _refuse(self, runtime: DeploymentRuntime, message: str) -> Response:
        self._metrics.rejected(runtime.name, 503)
        return retry_later(503, message, RETRY_AFTER_S)
