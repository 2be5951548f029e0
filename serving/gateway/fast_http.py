"""The gateway's lean HTTP/1.1 server: an asyncio.Protocol over httptools' parser.

uvicorn spends more CPU per request than the whole gateway (an ASGI scope and two message
dicts, header validation, flow-control objects, two writes per response); this protocol
parses with the same httptools and calls `GatewayApp.respond` directly: one task and one
write per request. It serves `/v2...` and `/metrics` (with `pass_through` off: every
request); with `pass_through` on, a connection whose next request begins with any other
path is handed, untouched, to uvicorn's own protocol (the portal's pages, uploads,
downloads and WebSockets stay on the battle-tested ASGI stack). Request boundaries are
only known where a read begins, so a request pipelined behind ours in the same read is
run through the ASGI app here instead (fast_asgi.py).

Requests on one connection run one at a time, answered in order (pipelined ones wait,
with reading paused). Bodies are read whole, up to `GatewayApp.max_body_bytes` (413
after that, then the connection closes); a malformed request gets a 400 JSON answer and
the connection closes; a head past MAX_HEAD_BYTES gets 431. `Expect: 100-continue` is
answered at once. Answers are written by fast_http_out.py: a streamed one (generate_stream,
streaming.py) goes out as it arrives, chunked (unframed to an HTTP/1.0 client, then the
connection closes). A client that goes away cancels its request the way the ASGI app's
`http.disconnect` does. uvicorn's server runs this protocol (service.py sets it as the
http protocol class), so its graceful stop applies: `shutdown` closes idle connections and
lets in-flight requests finish first.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections import deque
from typing import TYPE_CHECKING, Any, cast

import httptools

from serving.gateway.fast_asgi import (
    hand_to_uvicorn,
    is_gateway_path,
    run_asgi,
    starts_gateway_request,
)
from serving.gateway.fast_http_out import StreamWriter, write_response
from serving.gateway.requests import BODY_TOO_LARGE, BodyTooLarge
from serving.gateway.responses import Headers, Message, Response, error
from serving.gateway.streaming import StreamingResponse
from swarm_protocol.wire_numbers import parse_count

if TYPE_CHECKING:
    from serving.gateway.app import GatewayApp

# Past the app's own 431/414 limits (32 KiB of headers, 2 KiB of target), so those answer
# with their detail; this bound only stops a head that never ends from growing memory.
MAX_HEAD_BYTES = 256 * 1024
KEEP_ALIVE_S = 75.0  # an idle connection is closed after 1 to 2 times this
LINGER_S = 5.0  # after a refusal: how long what the client still sends is read and dropped
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
DISCONNECT: Message = {"type": "http.disconnect"}
logger = logging.getLogger("serving.gateway.fast_http")


class _Request:
    """One parsed request, waiting for its turn or being answered."""

    __slots__ = ("body", "head_only", "headers", "http_1_0", "keep_alive", "method", "path",
                 "query", "raw_path", "theirs")

    def __init__(self, method: str, path: str, raw_path: bytes, query: bytes,
                 headers: Headers, keep_alive: bool, theirs: bool, http_1_0: bool) -> None:
        self.method = method
        self.path = path
        self.raw_path = raw_path
        self.query = query
        self.headers = headers
        self.keep_alive = keep_alive
        self.head_only = method == "HEAD"
        self.theirs = theirs  # not the gateway's: the ASGI app answers it
        self.http_1_0 = http_1_0  # cannot read chunked framing
        self.body: bytes | BodyTooLarge = b""


class FastHTTPProtocol(asyncio.Protocol):
    """One client connection (see the module docstring)."""

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *,
                 gateway: GatewayApp, asgi_app: Any = None) -> None:
        """`config`, `server_state`, `app_state`: uvicorn's, as it builds its protocols;
        `asgi_app`: where other paths go (None: the gateway answers every path)."""
        self._config = config
        self._server_state = server_state
        self._app_state = app_state
        self._gateway = gateway
        self._max_body_digits = len(str(gateway.max_body_bytes))
        self._asgi_app = asgi_app
        self._loop = _loop or asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._peer: tuple[Any, Any] = (None, None)
        # per request being parsed
        self._url = b""
        self._headers: Headers = []
        self._head_bytes = 0
        self._expect_continue = False
        self._content_length = b""
        self._request: _Request | None = None
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._in_message = False
        self._in_head = False
        # per connection
        self._queue: deque[_Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._peeked = b""
        self._hand_over: bytes | None = None  # a request for uvicorn, waiting its turn
        self._last: Response | None = None  # a 400/431 to send once the queue is done
        self._discarding = False  # reads are ignored: the connection closes after the queue
        self._closing = False  # close after the current answer (SIGTERM, Connection: close)
        self._read_paused = False
        self._gone: asyncio.Future[None] | None = None
        self._out = StreamWriter(self._loop)  # flow control and the stream being sent
        self._served = 0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._served_at_check = -1

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._peer = (transport.get_extra_info("peername"), transport.get_extra_info("sockname"))
        self._server_state.connections.add(self)
        self._idle_timer = self._loop.call_later(KEEP_ALIVE_S, self._close_if_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server_state.connections.discard(self)
        self._transport = None
        self._queue.clear()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)
        elif self._gone is None:
            self._gone = self._loop.create_future()
            self._gone.set_result(None)
        self._out.lost()

    def pause_writing(self) -> None:
        self._out.pause()

    def resume_writing(self) -> None:
        self._out.resume()
        if self._task is None:
            self._next()

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._hand_over is not None:  # read before the pause took effect
            self._hand_over += data
            return
        if self._asgi_app is not None and not self._in_message:
            # A request starts this read: the portal's goes to uvicorn, bytes untouched.
            if self._peeked:
                data, self._peeked = self._peeked + data, b""
            ours = starts_gateway_request(data)
            if ours is None:
                self._peeked = data
                return
            if not ours:
                self._hand_over = data
                self._pause_reading()
                if self._task is None:
                    self._next()
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # Nothing under /v2 upgrades: answered as plain HTTP, and the rest read on.
            self.data_received(data[upgrade.args[0]:])
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if not isinstance(cause, httptools.HttpParserError):  # ours, not the client's
                logger.error("parsing a request failed", exc_info=cause)
            self._refuse(error(400, f"malformed HTTP request: {_reason(cause or exc)}"))
        except httptools.HttpParserError as exc:
            self._refuse(error(400, f"malformed HTTP request: {_reason(exc)}"))
        else:
            if self._in_head:
                # The parser keeps an unfinished header value whole: bound it here, where
                # every byte read since the request began is still its head.
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._refuse(error(431, f"the request head is longer than "
                                            f"{MAX_HEAD_BYTES} bytes"))

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._in_message = True
        self._in_head = True
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._expect_continue = False
        self._content_length = b""
        self._request = None
        self._body = []
        self._body_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length":
            self._content_length = value
        elif name == b"expect" and value.lower() == b"100-continue":
            self._expect_continue = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._discarding:
            return  # pipelined behind a refused request: never answered
        parser = self._parser
        url = httptools.parse_url(self._url)
        raw_path: bytes = url.path
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = urllib.parse.unquote(path)
        request = self._request = _Request(
            parser.get_method().decode("ascii"), path, raw_path, url.query or b"",
            self._headers, parser.should_keep_alive(),
            self._asgi_app is not None and not is_gateway_path(path),
            parser.get_http_version() == "1.0")
        if self._declared_too_large():
            self._over_limit(request)
        elif self._expect_continue and self._task is None and self._transport is not None:
            self._transport.write(CONTINUE)

    def on_body(self, body: bytes) -> None:
        request = self._request
        if request is None or request.body is BODY_TOO_LARGE:
            return
        self._body_bytes += len(body)
        if self._body_bytes > self._gateway.max_body_bytes:
            self._body = []
            self._over_limit(request)
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        request, self._request = self._request, None
        if request is None or request.body is BODY_TOO_LARGE:
            return
        body = self._body
        request.body = body[0] if len(body) == 1 else b"".join(body)
        self._queue_request(request)

    # answering, in order

    def _declared_too_large(self) -> bool:
        value = self._content_length
        # Fewer ASCII digits than the limit has is surely within it: no int() then.
        if not value or (len(value) < self._max_body_digits and value.isdigit()):
            return False
        return parse_count(value, self._gateway.max_body_bytes) is None

    def _over_limit(self, request: _Request) -> None:
        """Answer without reading the rest of the body; the connection closes after."""
        request.body = BODY_TOO_LARGE
        request.keep_alive = False
        self._discarding = True
        self._queue_request(request)

    def _queue_request(self, request: _Request) -> None:
        self._queue.append(request)
        if self._task is None:
            self._next()
        else:
            self._pause_reading()  # pipelined: read on once the queue is done

    def _refuse(self, response: Response) -> None:
        """Answer a request that could not be parsed once those before it are answered."""
        self._discarding = True
        self._last = response
        self._pause_reading()
        if self._task is None:
            self._next()

    def _next(self) -> None:
        """Start the next request, or do what waits for the queue to empty."""
        transport = self._transport
        if transport is None or self._out.paused:
            return  # resume_writing calls again
        if self._closing:
            self._linger(transport) if self._discarding else transport.close()
        elif self._queue:
            request = self._queue.popleft()
            self._task = self._loop.create_task(self._answer(request))
        elif self._last is not None:
            write_response(transport, self._last, keep_alive=False, head_only=False)
            self._linger(transport)
        elif self._hand_over is not None:
            self._hand_to_uvicorn(transport, self._hand_over)
        elif self._read_paused and not self._discarding:
            self._read_paused = False
            transport.resume_reading()

    async def _answer(self, request: _Request) -> None:
        response: Response | StreamingResponse | None
        try:
            if request.theirs:
                response = await run_asgi(self._asgi_app, request, self._peer, self._receive)
            else:
                response = await self._gateway.respond(
                    request.method, request.path, request.raw_path, request.query,
                    request.headers, request.body, self._receive)
        except Exception:
            logger.exception("internal error answering %s", request.path[:64])
            response = error(500, "internal error in the gateway")
        if isinstance(response, StreamingResponse):
            # Still this connection's task while it streams: nothing else starts meanwhile.
            if not await self._out.send(self._transport_now, response,
                                        request.keep_alive and not self._closing,
                                        chunked=not request.http_1_0):
                self._closing = True
            response = None
        self._task = None
        self._served += 1
        if self._transport is None:
            return
        if response is not None:
            write_response(self._transport, response, request.keep_alive and not self._closing,
                           request.head_only)
        if not request.keep_alive:
            self._closing = True
        self._next()

    def _transport_now(self) -> asyncio.Transport | None:
        return self._transport

    async def _receive(self) -> Message:
        """Return `http.disconnect` once the client has gone (core.py watches for it)."""
        if self._gone is None:
            self._gone = self._loop.create_future()
        await self._gone
        return DISCONNECT

    # connection management

    def _pause_reading(self) -> None:
        if not self._read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()

    def _linger(self, transport: asyncio.Transport) -> None:
        """Close after a refusal without destroying the answer: closing with unread input
        resets the connection, and the client may lose the answer it has not read yet.
        So stop sending, drop what the client still sends, and close when it does, or
        after LINGER_S (nginx's lingering close)."""
        self._discarding = True
        if transport.can_write_eof():
            transport.write_eof()  # after what is buffered has gone
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        self._loop.call_later(LINGER_S, transport.close)

    def _hand_to_uvicorn(self, transport: asyncio.Transport, data: bytes) -> None:
        """Give the connection, from the start of a request, to uvicorn's own protocol."""
        self._hand_over = None
        self._server_state.connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._transport = None
        hand_to_uvicorn(transport, data, self._config, self._server_state, self._app_state,
                        self._loop, resume_reading=self._read_paused)

    def _close_if_idle(self) -> None:
        transport = self._transport
        if transport is None:
            return
        if self._task is None and not self._in_message and self._served == self._served_at_check:
            transport.close()
            return
        self._served_at_check = self._served  # served since the last look: look again later
        self._idle_timer = self._loop.call_later(KEEP_ALIVE_S, self._close_if_idle)

    def shutdown(self) -> None:
        """Close now if idle, else after the answer in progress (uvicorn calls this)."""
        self._closing = True
        if self._transport is not None and self._task is None and not self._in_message:
            self._transport.close()


def _reason(exc: BaseException) -> str:
    return str(exc)[:120] or type(exc).__name__


def protocol_class(gateway: GatewayApp, asgi_app: Any = None) -> type[asyncio.Protocol]:
    """Return the protocol class to give uvicorn.Config(http=...): FastHTTPProtocol bound
    to `gateway` and, with pass-through, the ASGI app for the other paths."""

    class BoundFastHTTPProtocol(FastHTTPProtocol):
        def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                     _loop: asyncio.AbstractEventLoop | None = None) -> None:
            super().__init__(config, server_state, app_state, _loop, gateway=gateway,
                             asgi_app=asgi_app)

    return BoundFastHTTPProtocol
