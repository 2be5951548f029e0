"""The lean server's (fast_http.py) side of the pass-through: which requests are the
gateway's, and the ASGI app run for a portal request that cannot go to uvicorn.

A connection is handed to uvicorn only where a read begins with a request that is not
the gateway's; a portal request pipelined behind a gateway request in the same read has
no known start in the raw bytes, so it is answered here: the whole body in one
`http.request` message, the whole answer collected (up to MAX_ANSWER_BYTES) and returned
as a Response, which the lean server writes in its turn. Rare by construction: browsers
and the usual HTTP clients never pipeline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from serving.gateway.requests import BodyTooLarge
from serving.gateway.responses import Headers, Message, Response, Scope, error

MAX_ANSWER_BYTES = 64 * 1024 * 1024
# Framing is the lean server's: it sets Content-Length and Connection itself.
FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection", b"keep-alive"})
# A read that starts a request and has no space in this many bytes is not HTTP we route.
MAX_METHOD_BYTES = 24


def is_gateway_path(path: str) -> bool:
    """Return whether the gateway answers `path` itself (the rest is the portal's)."""
    return (path.startswith("/v2") and (len(path) == 3 or path[3] == "/")) \
        or path == "/metrics" or path.startswith("/v1/")


def starts_gateway_request(head: bytes) -> bool | None:
    """Return whether the request starting `head` (raw bytes) is the gateway's: True,
    False (another path), None (too few bytes yet to tell). Malformed heads are True:
    the gateway answers them (400)."""
    if head.startswith((b"POST /v2/models/", b"GET /v2/")):
        return True
    line = head.lstrip(b"\r\n")
    space = line.find(b" ", 0, MAX_METHOD_BYTES)
    if space < 0:
        return None if len(line) < MAX_METHOD_BYTES else True
    target = line[space + 1:space + 10]
    for prefix, ends in ((b"/v2", b"/? "), (b"/metrics", b"? "), (b"/v1", b"/")):
        if target.startswith(prefix):
            if len(target) == len(prefix):
                return None
            return target[len(prefix)] in ends
        if prefix.startswith(target):
            return None
    return False


class ParsedRequest(Protocol):
    """What the lean server parsed (fast_http._Request)."""

    method: str
    path: str
    raw_path: bytes
    query: bytes
    headers: Headers
    body: bytes | BodyTooLarge


class AnswerTooLarge(Exception):
    """The app's answer passed MAX_ANSWER_BYTES."""


async def run_asgi(app: Callable[[Scope, Any, Any], Awaitable[None]], request: ParsedRequest,
                   peer: tuple[Any, Any], disconnected: Callable[[], Awaitable[Message]],
                   ) -> Response | None:
    """Return the app's whole answer to `request` (None: the app sent none).

    `peer` is (client address, server address); `disconnected` returns `http.disconnect`
    once the client has gone."""
    if isinstance(request.body, BodyTooLarge):
        return error(413, "the request body is too large for a pipelined request")
    scope: Scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1", "scheme": "http", "method": request.method,
        "path": request.path, "raw_path": request.raw_path, "root_path": "",
        "query_string": request.query, "headers": request.headers,
        "client": peer[0], "server": peer[1], "state": {},
    }
    body = [request.body]
    answer: dict[str, Any] = {"status": None, "headers": [], "body": [], "bytes": 0}

    async def receive() -> Message:
        if body:
            return {"type": "http.request", "body": body.pop(), "more_body": False}
        return await disconnected()

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["headers"] = [(bytes(name).lower(), bytes(value))
                                 for name, value in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            chunk = bytes(message.get("body", b""))
            answer["bytes"] += len(chunk)
            if answer["bytes"] > MAX_ANSWER_BYTES:
                raise AnswerTooLarge
            answer["body"].append(chunk)

    try:
        await app(scope, receive, send)
    except AnswerTooLarge:
        return error(502, "the answer is too large for a pipelined request: send it on a "
                          "connection of its own")
    if answer["status"] is None:
        return None
    return Response(answer["status"], b"".join(answer["body"]),
                    [h for h in answer["headers"] if h[0] not in FRAMING])


def hand_to_uvicorn(transport: asyncio.Transport, data: bytes, config: Any,
                    server_state: Any, app_state: dict[str, Any],
                    loop: asyncio.AbstractEventLoop, *, resume_reading: bool) -> None:
    """Give a connection, at the start of a request (`data`: its bytes read so far), to
    uvicorn's own protocol, built as uvicorn builds it; `resume_reading`: reading was
    paused while the request waited its turn."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    protocol = HttpToolsProtocol(config=config, server_state=server_state,
                                 app_state=app_state, _loop=loop)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if resume_reading:
        transport.resume_reading()
    protocol.data_received(data)
