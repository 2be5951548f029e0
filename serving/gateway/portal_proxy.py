"""The pass-through to the portal behind `make run`'s single URL (everything but /v2).

An ASGI app that forwards HTTP requests (bodies streamed both ways, never buffered: uploads
of hundreds of MB, artifact downloads) with httpx, and WebSockets (the dashboards' live
updates) with `websockets`, to the portal over its unix socket or TCP. Host, cookies and
CSRF headers go through unchanged; hop-by-hop headers do not; X-Forwarded-For and
X-Forwarded-Proto are added. A portal that cannot be reached answers 502 (JSON); while it
restarts under `make run`, the connection waits in its socket's backlog instead.
This is not the inference hot path, so a well-kept client library is used here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any
from urllib.parse import urlsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from serving.gateway.responses import (
    Headers,
    Receive,
    Scope,
    Send,
    error,
    send_response,
)

logger = logging.getLogger("serving.gateway.portal_proxy")

# RFC 9110 7.6.1: meaningful for one connection only; never forwarded.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate",
                        b"proxy-authorization", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade"})
# The WebSocket handshake's own headers: the client library writes its own.
WS_HANDSHAKE = frozenset({b"host", b"origin", b"user-agent", b"content-length",
                          b"sec-websocket-key", b"sec-websocket-version",
                          b"sec-websocket-extensions", b"sec-websocket-protocol",
                          b"sec-websocket-accept"})
CONNECT_TIMEOUT_S = 10.0
# Uploads are validated synchronously by the portal (seconds to minutes for a large one).
READ_TIMEOUT_S = 600.0
WS_MAX_MESSAGE_BYTES = 4 * 1024**2


class PortalProxy:
    """ASGI app forwarding HTTP and WebSocket requests to the portal."""

    def __init__(self, portal_url: str, *, uds_path: str | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 read_timeout_s: float = READ_TIMEOUT_S) -> None:
        parts = urlsplit(portal_url)
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._ws_scheme = "wss" if parts.scheme == "https" else "ws"
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port
        self._uds_path = uds_path
        self._connect_timeout_s = connect_timeout_s
        transport = httpx.AsyncHTTPTransport(uds=uds_path, retries=0)
        timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        # Cookies pass through untouched: the client keeps none of its own. One client
        # serves every user, so a kept Set-Cookie (a login's sessionid) would be sent with
        # every later request that has no Cookie header: strangers served as that user.
        self._client = httpx.AsyncClient(transport=transport, timeout=timeout,
                                         trust_env=False, follow_redirects=False,
                                         cookies=cookieless_jar())

    async def aclose(self) -> None:
        """Close the pooled connections to the portal."""
        await self._client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)

    # HTTP

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = self._client.build_request(
            scope["method"], self._origin + _target(scope), headers=forwarded_headers(scope),
            content=_request_body(receive) if _has_body(scope) else None)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            logger.warning("the portal is not reachable: %r", exc)
            await send_response(send, error(502, "the portal is not reachable; try again "
                                                 "in a moment"))
            return
        except ClientDisconnected:
            return
        try:
            await _relay_response(response, receive, send)
        finally:
            await response.aclose()

    # WebSocket

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        try:
            upstream = await self._ws_connect(scope)
        except InvalidStatus as refused:  # the portal refused: so do we (uvicorn sends 403)
            logger.info("the portal refused a WebSocket: %s", refused.response.status_code)
            await send({"type": "websocket.close", "code": 1008})
            return
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            logger.warning("could not open a WebSocket to the portal: %r", exc)
            await send({"type": "websocket.close", "code": 1011})
            return
        async with upstream:
            await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
            await _pump_websocket(upstream, receive, send)

    async def _ws_connect(self, scope: Scope) -> ClientConnection:
        """Open the portal's side of a WebSocket, as the client asked for it."""
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1") or self._host
        uri = f"{self._ws_scheme}://{host}{_target(scope)}"
        origin = headers.get(b"origin")
        where: dict[str, Any] = ({"unix": True, "path": self._uds_path} if self._uds_path
                                 else {"host": self._host, "port": self._port})
        return await connect(
            uri, origin=origin.decode("latin-1") if origin else None,
            subprotocols=scope.get("subprotocols") or None, compression=None,
            additional_headers=[(k.decode("latin-1"), v.decode("latin-1"))
                                for k, v in forwarded_headers(scope)
                                if k not in WS_HANDSHAKE],
            user_agent_header=None, proxy=None, open_timeout=self._connect_timeout_s,
            max_size=WS_MAX_MESSAGE_BYTES, ping_interval=None, **where)


class ClientDisconnected(Exception):
    """The client went away while its request body was being forwarded."""


def cookieless_jar() -> CookieJar:
    """Return a cookie jar that keeps nothing: each client's own Cookie header is forwarded.

    A jar with a policy that allows no domain, not an httpx.Cookies subclass: httpx copies
    a Cookies given to a client into a plain jar (the subclass's methods are lost), but
    keeps a CookieJar as it is, policy included.
    """
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def _target(scope: Scope) -> str:
    """Return the request's path and query as the client sent them."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    return (raw + b"?" + query if query else raw).decode("latin-1")


def forwarded_headers(scope: Scope) -> Headers:
    """Return the client's headers without hop-by-hop ones, with X-Forwarded-* added."""
    headers: Headers = scope["headers"]
    named = {name.strip().lower() for name, value in headers if name == b"connection"
             for name in value.split(b",")}
    dropped = HOP_BY_HOP | named
    forwarded: Headers = []
    client_for, proto = b"", None
    for name, value in headers:
        if name == b"x-forwarded-for":
            client_for = value if not client_for else client_for + b", " + value
        elif name == b"x-forwarded-proto":
            proto = value  # set by a TLS proxy in front of us
        elif name not in dropped:
            forwarded.append((name, value))
    client = scope.get("client")
    if client:
        address = str(client[0]).encode()
        client_for = client_for + b", " + address if client_for else address
    if client_for:
        forwarded.append((b"x-forwarded-for", client_for))
    scheme = "http" if scope.get("scheme", "http") in ("http", "ws") else "https"
    forwarded.append((b"x-forwarded-proto", proto or scheme.encode()))
    return forwarded


def _has_body(scope: Scope) -> bool:
    """Return whether the client sends a body (a GET usually does not: send none on)."""
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            return True
    return False


async def _request_body(receive: Receive) -> AsyncIterator[bytes]:
    """Yield the request body as it arrives; raise ClientDisconnected if the client goes."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _relay_response(response: httpx.Response, receive: Receive, send: Send) -> None:
    """Stream the portal's answer to the client; stop early if the client hangs up."""
    headers = [(name.lower(), value) for name, value in response.headers.raw
               if name.lower() not in HOP_BY_HOP]
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": headers})
    relay = asyncio.ensure_future(_relay_body(response, send))
    hang_up = asyncio.ensure_future(_client_gone(receive))
    try:
        await asyncio.wait({relay, hang_up}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hang_up.cancel()
        if not relay.done():  # the client left: read no more of a large download
            relay.cancel()
        await asyncio.gather(hang_up, return_exceptions=True)
        try:
            await relay
        except asyncio.CancelledError:
            pass
        except httpx.HTTPError as exc:  # the portal died mid-answer: the client sees a cut
            logger.warning("the portal's answer broke off: %r", exc)


async def _relay_body(response: httpx.Response, send: Send) -> None:
    async for chunk in response.aiter_raw():  # raw: a compressed body stays compressed
        if chunk:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _client_gone(receive: Receive) -> None:
    """Return once the client has disconnected (the request body is read by then)."""
    while (await receive())["type"] != "http.disconnect":
        continue


async def _pump_websocket(upstream: ClientConnection, receive: Receive, send: Send) -> None:
    """Relay messages both ways until either side closes."""
    to_portal = asyncio.ensure_future(_client_to_portal(upstream, receive))
    to_client = asyncio.ensure_future(_portal_to_client(upstream, send))
    done, pending = await asyncio.wait({to_portal, to_client},
                                       return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()


async def _client_to_portal(upstream: ClientConnection, receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            await upstream.close(code=_closable(message.get("code", 1000)))
            return
        if message["type"] != "websocket.receive":
            continue
        text = message.get("text")
        try:
            await upstream.send(text if text is not None else message.get("bytes") or b"")
        except ConnectionClosed:
            return


async def _portal_to_client(upstream: ClientConnection, send: Send) -> None:
    try:
        async for data in upstream:
            key = "text" if isinstance(data, str) else "bytes"
            await send({"type": "websocket.send", key: data})
    except ConnectionClosed:
        pass
    code = upstream.close_code or 1000
    with contextlib.suppress(Exception):  # the client may be gone already
        await send({"type": "websocket.close", "code": _closable(code)})


def _closable(code: int) -> int:
    """Return a close code an endpoint may send (1005/1006 are reserved: say 1000)."""
    return code if code in (1000, 1001, 1008, 1011, 1012) or 3000 <= code < 5000 else 1000
