"""The gateway's plain ASGI application: OIP v2 REST for every deployment in the table.

No framework: a dict lookup finds the fixed endpoints, `/v2/models/...` is split once, and
every answer is JSON (or the replica's own body). Auth, rate limits and metrics are plain
code over in-memory state; the routing table is refreshed by a background task started on
the first request (the portal's ASGI stack has no lifespan), so no request waits on it.

This module is the REST transport only: it reads the ASGI request and calls the core it
shares with the gRPC servicer (core.py: `admit`, then `infer`).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any

from serving.gateway.core import (
    DEFAULT_MAX_BODY_BYTES,
    SERVER_NAME,
    UNKNOWN_MODEL_LABEL,
    GatewayCore,
)
from serving.gateway.forwarding import UpstreamRequest
from serving.gateway.limits import header_refusal, headers_fit, shown, target_refusal
from serving.gateway.metrics import CONTENT_TYPE
from serving.gateway.openai import GENERATE_ACTIONS, V1_PREFIX, OpenAIEndpoints
from serving.gateway.openai_wire import openai_error
from serving.gateway.requests import (
    INFERENCE_ACTIONS,
    BodyTooLarge,
    ClientGone,
    ModelPath,
    read_body,
)
from serving.gateway.responses import (
    Headers,
    Receive,
    Response,
    Scope,
    Send,
    error,
    json_response,
    send_response,
)
from serving.gateway.routes import SessionAuth, TableSource
from serving.gateway.streaming import StreamingResponse, send_stream
from swarm_protocol.wire_numbers import parse_count

__all__ = ["DEFAULT_MAX_BODY_BYTES", "SERVER_NAME", "UNKNOWN_MODEL_LABEL", "GatewayApp"]
# Sent on to the replica; the client's Authorization is replaced by the replica key.
FORWARD_HEADERS = frozenset({b"content-type", b"inference-header-content-length", b"accept",
                             b"content-encoding"})
logger = logging.getLogger("serving.gateway")


class GatewayApp(GatewayCore):
    """ASGI callable serving /v2 (and /metrics) for every deployment in the routing table."""

    def __init__(self, source: TableSource, session_auth: SessionAuth | None = None, *,
                 metrics_token: str | None = None, **options: Any) -> None:
        """`metrics_token`: the bearer token /metrics asks for (None: none); `options`
        go to GatewayCore (max_body_bytes, clocks, rng, balancer_config, pool, ...)."""
        super().__init__(source, session_auth, **options)
        self._metrics_bearer = f"Bearer {metrics_token}".encode() if metrics_token else None
        self._fixed: dict[str, Callable[[str, Headers], Response]] = {
            "/v2": self._metadata_endpoint, "/v2/": self._metadata_endpoint,
            "/v2/health/live": self._live, "/v2/health/ready": self._health_ready,
            "/metrics": self._metrics_endpoint,
        }
        self.openai = OpenAIEndpoints(self)  # /v1: the OpenAI-compatible endpoints

    # ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await _lifespan(receive, send)
            return
        response = await self.respond(scope["method"], scope["path"],
                                      scope.get("raw_path") or b"", scope["query_string"],
                                      scope["headers"], None, receive)
        if isinstance(response, StreamingResponse):
            await send_stream(send, receive, response)
        elif response is not None:
            await send_response(send, response)

    # any transport: the ASGI app above, the lean HTTP/1.1 server (fast_http.py)

    async def respond(self, method: str, path: str, raw_path: bytes, query: bytes,
                      headers: Headers, body: bytes | BodyTooLarge | None,
                      receive: Receive | None) -> Response | StreamingResponse | None:
        """Return the answer to one request; None when the client left meanwhile; a
        StreamingResponse (generate_stream) that the transport must send and `end`.

        `path` is percent-decoded, `raw_path` as sent (b"": encode `path`), `headers`
        are (lower-case name, value) pairs. `body` is the whole body as the transport read
        it (BodyTooLarge: it passed max_body_bytes), or None to read it from `receive`
        once the request is admitted. `receive` yields `http.disconnect` when the client
        goes (None: the transport cancels the task itself).
        """
        if not self._ready:
            await self.start()
        fixed = self._fixed.get(path)
        refused = target_refusal(path, query)
        if refused is not None:
            return refused
        if fixed is not None:
            # Model endpoints count header bytes as they look for credentials.
            return fixed(method, headers) if headers_fit(headers) else header_refusal(headers)
        if path.startswith("/v2/models/"):
            try:
                return await self._model_response(method, path, raw_path, query, headers,
                                                  body, receive)
            except Exception:
                logger.exception("internal error on %s %s", shown(method), shown(path))
                return error(500, "internal error in the gateway")
        if path.startswith(V1_PREFIX):
            try:
                return await self.openai.respond(method, path, headers, body, receive)
            except Exception:
                logger.exception("internal error on %s %s", shown(method), shown(path))
                return openai_error(500, "internal error in the gateway")
        return error(404, f"no such endpoint: {path}")

    # fixed endpoints

    def _metadata_endpoint(self, method: str, headers: Headers) -> Response:
        if method not in ("GET", "HEAD"):
            return _method_not_allowed("GET")
        return self._server_metadata

    def _live(self, method: str, headers: Headers) -> Response:
        return json_response(200, {"live": True})

    def _health_ready(self, method: str, headers: Headers) -> Response:
        if self._ready:
            return json_response(200, {"ready": True})
        return json_response(503, {"ready": False}, [(b"retry-after", b"1")])

    def _metrics_endpoint(self, method: str, headers: Headers) -> Response:
        if not self.metrics.enabled:
            return error(404, "metrics are off")
        if self._metrics_bearer is not None:
            given = dict(headers).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._metrics_bearer):
                return error(401, "the metrics need 'Authorization: Bearer <metrics token>'",
                             [(b"www-authenticate", b"Bearer")])
        return Response(200, self.metrics.render(), [(b"content-type", CONTENT_TYPE)])

    # /v2/models/...

    async def _model_response(self, method: str, path: str, raw_path: bytes, query: bytes,
                              headers: Headers, body: bytes | BodyTooLarge | None,
                              receive: Receive | None) -> Response | StreamingResponse | None:
        target = self._model_path(method, path)
        if isinstance(target, Response):
            return target
        runtime = await self.admit(target, headers)
        if isinstance(runtime, Response):
            return runtime
        generates = target.action in GENERATE_ACTIONS  # charged to the key's token limit
        if generates and (spent := self.openai.tokens_refusal(headers, runtime.name, True)):
            return spent
        # The body is read here, not in a helper coroutine: one frame less per request.
        started_s = self._clock()
        forwarded, declared = _forwarded_headers(headers)
        if body is None:
            # Fewer ASCII digits than the limit has is surely within it: no int() per request.
            short = len(declared) < self._max_body_digits and declared.isdigit()
            if declared and not short and parse_count(declared, self.max_body_bytes) is None:
                if not declared.isdigit():
                    return error(400, "Content-Length must be a non-negative integer")
                return self._too_large(runtime)
            assert receive is not None, "no body and nothing to read it from"
            try:
                body = await read_body(receive, self.max_body_bytes)
            except ClientGone:
                self.metrics.cancelled(runtime.name)
                return None
            if body is None:
                return self._too_large(runtime)
        elif isinstance(body, BodyTooLarge):
            return self._too_large(runtime)
        target_path = raw_path or path.encode()
        request = UpstreamRequest(b"POST", target_path + b"?" + query if query else target_path,
                                  forwarded, body)
        if generates:
            request.affinity = self.openai.generate_affinity(runtime.route, body)
        response = await self.infer(runtime, target, request, started_s, receive,
                                    stream=target.action == "generate_stream")
        return self.openai.charge(headers, response) if generates else response

    def _model_path(self, method: str, path: str) -> ModelPath | Response:
        """Return the parsed model path, or the 404/405 answer when there is none."""
        target = self._model_paths.get(path) or self.model_target(path)
        if target is None:
            return error(404, f"no such endpoint: {path}")
        wanted = "POST" if target.action in INFERENCE_ACTIONS else "GET"
        if method != wanted and not (wanted == "GET" and method == "HEAD"):
            return _method_not_allowed(wanted)
        return target


def _forwarded_headers(headers: Headers) -> tuple[Headers, bytes]:
    """Return the headers to send on to the replica, and the declared Content-Length."""
    forwarded: Headers = []
    declared = b""
    for name, value in headers:
        if name in FORWARD_HEADERS:
            forwarded.append((name, value))
        elif name == b"content-length":
            declared = value
    return forwarded, declared


def _method_not_allowed(allowed: str) -> Response:
    return error(405, f"use {allowed} here", [(b"allow", allowed.encode())])


async def _lifespan(receive: Receive, send: Send) -> None:
    # Answered only so the app runs under servers with lifespan on; nothing to set up.
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
