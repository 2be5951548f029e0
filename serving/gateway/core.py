"""The gateway's transport-neutral core: one inference path for REST and gRPC.

KServe's transport -> dataplane split: `GatewayCore` holds the routing table, keys, rate
limits, balancers, hold at zero and metrics, and answers plain values. `admit` (table,
credentials, model and version, metadata and readiness answers, rate limit) and `infer`
(version draw, hold at zero, balanced forwarding with retries, metrics) take a parsed
target, header pairs and an UpstreamRequest and return a Response (or, for a stream, a
StreamingResponse the transport sends as it arrives: streaming.py); the ASGI app
(app.py) and the gRPC servicer (grpc_server.py) only translate their wire formats to
these and back, so both transports get the same behaviour from the same code.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Literal, overload

from serving.balancing import BalancerConfig
from serving.gateway.auth import Authenticator, Rejected, SessionCache
from serving.gateway.deployments import DeploymentRuntime, Fleet
from serving.gateway.forwarding import Forwarder, UpstreamRequest
from serving.gateway.hold import Activator, ColdStarts
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.ratelimit import RateLimiter, retry_after_s
from serving.gateway.refresh import TableRefresher, log_source_failure
from serving.gateway.requests import DisconnectWatcher, ModelPath, parse_model_path
from serving.gateway.responses import (
    JSON_HEADERS,
    Headers,
    Receive,
    Response,
    error,
    json_response,
    retry_later,
)
from serving.gateway.routes import ApiKeyRoute, RouteTable, SessionAuth, TableSource
from serving.gateway.streaming import StreamEnd, StreamingResponse, StreamSummary
from serving.gateway.upstream import UpstreamPool
from serving.traffic import version_for_request

SERVER_NAME = "swarm-portal"
SERVER_VERSION = "0.1.0"
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_CACHED_PATHS = 10_000
# The model label of what the gateway refuses for a name it does not serve: a made-up name
# in the URL must never become a metric series of its own.
UNKNOWN_MODEL_LABEL = "_unknown"
# Requests shorter than this never pay for a task watching for the client to go away.
WATCH_AFTER_S = 0.05
_UNPARSED = ModelPath("", None, "", "")
CLIENT_GONE = Response(499, b"", [])  # a marker: the client hung up while held
# The status a stream that did not complete counts as (its head said 200).
_STREAM_STATUSES = {StreamEnd.BROKEN: 502, StreamEnd.TIMEOUT: 504}
logger = logging.getLogger("serving.gateway")


class GatewayCore:
    """Routing table, credentials, limits, balancing and metrics for every transport."""

    def __init__(self, source: TableSource, session_auth: SessionAuth | None = None, *,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, metrics_enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None,
                 balancer_config: BalancerConfig | None = None,
                 pool: UpstreamPool | None = None,
                 activator: Activator | None = None,
                 poll_interval_s: float = 0.2, full_reload_s: float = 5.0) -> None:
        self.max_body_bytes = max_body_bytes
        self._max_body_digits = len(str(max_body_bytes))
        self._clock = clock
        # Canary splits and p2c need fair draws, not secrets.
        self._rng = rng or random.Random()  # noqa: S311
        self.fleet = Fleet(self._rng, balancer_config or BalancerConfig())
        self.metrics = GatewayMetrics(metrics_enabled, lambda: self.fleet.live(clock()))
        sessions = SessionCache(session_auth, clock) if session_auth is not None else None
        self._auth = Authenticator(sessions, wall_clock)
        self._limiter = RateLimiter()
        self.pool = pool or UpstreamPool()
        self._forwarder = Forwarder(self.pool, self.metrics, clock)
        self._disconnects = DisconnectWatcher(WATCH_AFTER_S)
        self.cold_starts = ColdStarts(activator)
        self.refresher = TableRefresher(source, self._apply_table, clock, poll_interval_s,
                                        full_reload_s, self._take_successes,
                                        take_keys_used=self._take_keys_used)
        self._wall_clock = wall_clock
        # {API key id: unix s it was last admitted}, reported and emptied once a second;
        # ids come from the routing table only, so it is bounded by the keys there.
        self._keys_used_s: dict[int, float] = {}
        self._ready = False
        self._start_task: asyncio.Task[None] | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._server_metadata = json_response(200, {
            "name": SERVER_NAME, "version": SERVER_VERSION,
            "extensions": ["binary_tensor_data"]})
        self._model_paths: dict[str, ModelPath | None] = {}
        self._loop: tuple[asyncio.AbstractEventLoop, int] | None = None  # _running_loop

    # introspection, for tests and the portal

    @property
    def table(self) -> RouteTable:
        """Return the routing table in use."""
        return self.fleet.table

    def in_flight(self) -> dict[str, int]:
        """Return attempts in flight per deployment (leases not yet released)."""
        return self.fleet.in_flight()

    def queue_depth(self) -> dict[str, int]:
        """Return requests waiting for a replica per deployment."""
        return self.fleet.queue_depth()

    def state_sizes(self) -> dict[str, int]:
        """Return the size of everything the gateway keeps per client input (for tests)."""
        return {**self._auth.sizes(), "model_paths": len(self._model_paths),
                "rate_buckets": len(self._limiter), "held": len(self.cold_starts.held),
                "version_metrics": self.metrics.version_count()}

    async def aclose(self) -> None:
        """Stop the refresh loop and close idle upstream connections."""
        for task in (self._poll_task, self._start_task):
            if task is not None and not task.done():
                task.cancel()
        self.cold_starts.cancel()
        self.pool.close()

    # the table

    @property
    def ready(self) -> bool:
        """Return whether a routing table has been loaded."""
        return self._ready

    def now_s(self) -> float:
        """Return the gateway clock's time (request durations are measured on it)."""
        return self._clock()

    @property
    def server_metadata(self) -> Response:
        """Return the server metadata answer (name, version, extensions)."""
        return self._server_metadata

    async def start(self) -> None:
        """Load the first table and start the refresh loop (once; the loop retries)."""
        if self._start_task is None:
            self._start_task = asyncio.get_running_loop().create_task(self._load_first())
        await asyncio.shield(self._start_task)

    async def _load_first(self) -> None:
        failures = 0
        try:
            await self.refresher.load()
        except Exception as exc:
            # Requests get 503 meanwhile; only the refresh loop asks the source again. A
            # portal still starting is expected (one line); anything else is a bug.
            failures = 1
            log_source_failure("routing table not loaded yet", "retrying", exc)
        finally:
            self._poll_task = asyncio.get_running_loop().create_task(
                self.refresher.run(failures))

    def _take_successes(self) -> set[int]:
        taken, self._forwarder.succeeded = self._forwarder.succeeded, set()
        return taken

    def _take_keys_used(self) -> dict[int, float]:
        taken, self._keys_used_s = self._keys_used_s, {}
        return taken

    def _apply_table(self, table: RouteTable) -> None:
        self.fleet.apply(table)
        self._limiter.forget_all_but({key.key_id for key in table.api_keys.values()})
        self._ready = True

    # requests

    def model_target(self, path: str) -> ModelPath | None:
        """Return the parts of a `/v2/models/...` path (cached for served ones), or None."""
        target = self._model_paths.get(path, _UNPARSED)
        if target is _UNPARSED:
            target = parse_model_path(path)
            if target is not None and self._servable(target):
                # Only paths we serve are kept: made-up ones are parsed again each time.
                if len(self._model_paths) >= MAX_CACHED_PATHS:
                    self._model_paths.clear()
                self._model_paths[path] = target
        return target

    async def authorize(self, headers: Headers, deployment: str,
                        known: bool) -> ApiKeyRoute | None:
        """Return the caller's key (None: a portal session) for `deployment` (`known`:
        it is in the table). A key the table lacks gets one early poll first (a key
        created a moment ago works at once, not at the next poll).

        Raises Rejected (401/403/431) when the credentials in `headers` do not allow it.
        """
        try:
            return await self._auth.authorize(self.fleet.table.api_keys, headers, deployment,
                                              known)
        except Rejected as rejected:
            if not rejected.unknown_key:
                raise
        await self.refresher.refresh_soon()
        return await self._auth.authorize(self.fleet.table.api_keys, headers, deployment, known)

    async def admit(self, target: ModelPath, headers: Headers) -> Response | DeploymentRuntime:
        """Return the deployment an inference request may go to, or the answer that ends
        the request: 503 (no table yet), 401/403/431 (credentials in `headers`), 404,
        the metadata or readiness answer, 429 (rate limit)."""
        if not self._ready:
            return retry_later(503, "the gateway has no routing table yet", 1)
        runtime = self.fleet.deployments.get(target.name)
        try:
            key = await self.authorize(headers, target.name, runtime is not None)
        except Rejected as rejected:
            self.metrics.rejected(target.name if runtime is not None else UNKNOWN_MODEL_LABEL,
                                  rejected.response.status)
            return rejected.response
        if key is not None:
            self._keys_used_s[key.key_id] = self._wall_clock()
        if runtime is None:
            return error(404, f"unknown model {target.name!r}")
        if target.version is not None and target.version not in runtime.routing_weights:
            return error(404, f"unknown version {target.version_text!r} of model "
                              f"{target.name!r}")
        if target.action == "":
            return Response(200, runtime.metadata(target.version), JSON_HEADERS)
        if target.action == "ready":
            return self._model_ready(runtime, target)
        refused = self._rate_limited(key, target.name)
        return runtime if refused is None else refused

    def _servable(self, target: ModelPath) -> bool:
        """Return whether a parsed path names a deployment (and version) in the table."""
        runtime = self.fleet.deployments.get(target.name)
        return runtime is not None and (target.version is None
                                        or target.version in runtime.routing_weights)

    def _rate_limited(self, key: ApiKeyRoute | None, deployment: str) -> Response | None:
        """Count an inference request against its key; return a 429 when over the limit."""
        if key is None:  # a portal session: the playground has no per-key limit
            return None
        wait_s = self._limiter.wait_s(key, self._clock())
        if wait_s <= 0:
            return None
        self.metrics.rejected(deployment, 429)
        return retry_later(429, "rate limit exceeded for this API key", retry_after_s(wait_s))

    def token_wait_s(self, key: ApiKeyRoute) -> float:
        """Return how long `key` must wait before its token bucket admits again (<= 0:
        now; keys without a tokens-per-minute limit never wait)."""
        return self._limiter.tokens_wait_s(key, self._clock())

    def charge_tokens(self, key: ApiKeyRoute, tokens: int) -> None:
        """Debit `tokens` (generated and prompt tokens of one answer) from `key`'s bucket."""
        self._limiter.debit_tokens(key, tokens, self._clock())

    def _model_ready(self, runtime: DeploymentRuntime, target: ModelPath) -> Response:
        if runtime.is_ready(target.version):
            return json_response(200, {"name": runtime.name, "ready": True})
        return json_response(503, {"name": runtime.name, "ready": False},
                             [(b"retry-after", b"1")])

    @overload
    async def infer(self, runtime: DeploymentRuntime, target: ModelPath,
                    request: UpstreamRequest, started_s: float,
                    receive: Receive | None = None, *,
                    stream: Literal[False] = False) -> Response | None: ...

    @overload
    async def infer(self, runtime: DeploymentRuntime, target: ModelPath,
                    request: UpstreamRequest, started_s: float,
                    receive: Receive | None = None, *,
                    stream: bool) -> Response | StreamingResponse | None: ...

    async def infer(self, runtime: DeploymentRuntime, target: ModelPath,
                    request: UpstreamRequest, started_s: float,
                    receive: Receive | None = None, *,
                    stream: bool = False) -> Response | StreamingResponse | None:
        """Return the answer to an admitted inference request (None: the client left).

        `started_s` is the clock's time the request began; `receive` is watched for the
        client's disconnect until the answer (None: the transport cancels this task itself
        when it goes). `stream`: a replica answer that streams (generate_stream's
        Server-Sent Events) comes back as a StreamingResponse as soon as its head is in;
        the transport sends it on (streaming.py) and must `end` it. Its metrics (time to
        the first chunk, duration, streams in flight) are counted here, through its hooks.
        """
        version = self._version(runtime, target)
        if version is None:
            self.metrics.rejected(runtime.name, 503)
            return retry_later(503, f"no version of {runtime.name!r} takes traffic", 1)
        if not runtime.route.replicas:
            # A replica may have become ready a moment ago (the portal's pages already say
            # so): one early poll, shared by concurrent requests, before a hold or a 503.
            await self.refresher.refresh_soon()
            runtime = self.fleet.deployments.get(runtime.name, runtime)
        if not runtime.route.replicas and runtime.route.hold_timeout_s > 0:
            refused = await self._hold(receive, runtime)
            if refused is not None:
                return None if refused is CLIENT_GONE else refused
        loop = self._running_loop()
        deadline = loop.time() + runtime.route.request_timeout_s
        response: Response | StreamingResponse | None
        if receive is None:
            response = await self._forwarder.forward(runtime, version, request, deadline,
                                                     stream)
        else:
            response = await self._forward_watching(loop, receive, runtime, version, request,
                                                    deadline, stream)
        if response is None:
            self.metrics.cancelled(runtime.name)
            return None
        if isinstance(response, StreamingResponse):
            self._count_stream(runtime.name, version, response, started_s)
            return response
        self.metrics.for_version(runtime.name, version).observe(
            response.status, self._clock() - started_s)
        return response

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """Return the running event loop. On Python 3.11 asyncio.get_running_loop() makes a
        getpid() system call each time (4 % of the gateway's CPU at concurrency 1 on a 2-core
        VM, py-spy). A loop seen on this thread that is still running is this thread's
        running loop: a thread runs one loop at a time (tests may run others elsewhere)."""
        cached = self._loop
        if cached is not None and cached[1] == threading.get_ident() and cached[0].is_running():
            return cached[0]  # running, and seen on this thread: no other loop can run here
        loop = asyncio.get_running_loop()
        self._loop = (loop, threading.get_ident())
        return loop

    def _count_stream(self, name: str, version: int, response: StreamingResponse,
                      started_s: float) -> None:
        """Count a stream in flight until it ends; its time to the first chunk (request
        start to the first body byte handed to the client), and its duration when done."""
        metrics, clock = self.metrics, self._clock
        metrics.stream_started(name)
        response.on_first_chunk.append(lambda: metrics.first_token(name, clock() - started_s))

        def ended(summary: StreamSummary) -> None:
            metrics.stream_ended(name)
            if summary.outcome is StreamEnd.CLIENT_GONE:
                metrics.cancelled(name)
                return
            status = _STREAM_STATUSES.get(summary.outcome, summary.status)
            metrics.for_version(name, version).observe(status, clock() - started_s)

        response.on_end.append(ended)

    async def _hold(self, receive: Receive | None,
                    runtime: DeploymentRuntime) -> Response | None:
        """Wait while a deployment at zero starts a replica: None once one is listed, the
        503 if none comes in time, CLIENT_GONE if the client hangs up meanwhile."""
        watch = None if receive is None else \
            self._disconnects.watch(self._running_loop(), receive)
        try:
            refused = await self.cold_starts.hold(runtime, runtime.route.hold_timeout_s)
        except asyncio.CancelledError:
            if watch is None or not watch.client_gone:
                raise
            watch.task.uncancel()
            self.metrics.cancelled(runtime.name)
            return CLIENT_GONE  # no longer held: the count the auto-scaler sees drops
        finally:
            if watch is not None:
                self._disconnects.stop(watch)
        if refused is None:
            return None
        self.metrics.rejected(runtime.name, 503)
        return retry_later(503, refused, 1)

    def _version(self, runtime: DeploymentRuntime, target: ModelPath) -> int | None:
        """Return the version this request goes to (None: no version takes traffic)."""
        if target.version is not None:
            return target.version  # checked against the table already
        if runtime.sole_version is not None:
            return runtime.sole_version  # the common case: no draw
        if not runtime.has_traffic:
            return None
        return version_for_request(runtime.routing_weights, self._rng)

    def _too_large(self, runtime: DeploymentRuntime) -> Response:
        self.metrics.rejected(runtime.name, 413)
        return error(413, f"the request body is larger than {self.max_body_bytes} bytes")

    async def _forward_watching(self, loop: asyncio.AbstractEventLoop, receive: Receive,
                                runtime: DeploymentRuntime, version: int,
                                request: UpstreamRequest, deadline: float, stream: bool,
                                ) -> Response | StreamingResponse | None:
        """Forward, but give up (None) once the client has disconnected."""
        watch = self._disconnects.watch(loop, receive)
        try:
            return await self._forwarder.forward(runtime, version, request, deadline, stream)
        except asyncio.CancelledError:
            if not watch.client_gone:
                raise
            watch.task.uncancel()
            return None
        finally:
            self._disconnects.stop(watch)
