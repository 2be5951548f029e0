"""One streamed exchange on a pooled upstream connection: the head at once, then the body
chunk by chunk as the replica sends it (generate_stream's Server-Sent Events).

The pool's plain exchange (upstream.py) reads a response whole; a stream cannot wait for
its end. For one exchange the connection's transport is handed to a `StreamExchange`
(`transport.set_protocol`), so the plain path's protocol gains no branch and no callback:
it parses with a parser of its own, answers the head as an `UpstreamStream` when the
replica streams (a 2xx-4xx head that is chunked or `text/event-stream`), or the whole
`UpstreamResponse` otherwise (an error with a Content-Length: a 503 is retried elsewhere
as any other). After a complete stream the transport goes back to its connection and the
connection to the pool; after anything else (broken, timed out, abandoned by the client)
the connection is closed, never reused, which is also how the replica learns the client
left (it cancels the sequence).

Flow control: chunks wait in a queue while the client is slower than the replica; past
PAUSE_AT_BYTES the replica's socket is no longer read (TCP then slows the replica).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import cast

import httptools

from serving.gateway.node_tls import UpstreamTls
from serving.gateway.upstream import (
    ConnectionBroken,
    Headers,
    PooledConnection,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
)

PAUSE_AT_BYTES = 256 * 1024  # queued, not yet taken by the client: stop reading the replica
_STREAM_TYPES = (b"text/event-stream",)


def streams(status: int, headers: Headers) -> bool:
    """Return whether an answer with this head is relayed as it arrives: not a 5xx (those
    are retried elsewhere, whole), and chunked or Server-Sent Events."""
    if status >= 500:
        return False
    for name, value in headers:
        if name == b"content-type" and value.lower().startswith(_STREAM_TYPES):
            return True
        if name == b"transfer-encoding" and b"chunked" in value.lower():
            return True
    return False


async def open_stream(pool: UpstreamPool, host: str, port: int, method: bytes, target: bytes,
                      headers: Sequence[tuple[bytes, bytes]], body: bytes,
                      deadline: float | None, tls: UpstreamTls | None = None,
                      ) -> UpstreamResponse | UpstreamStream:
    """Send one request to host:port on a pooled connection; return the stream once its
    head is in, or the whole answer when the replica does not stream (see `streams`).

    Raises what UpstreamPool.request raises, and retries a reused connection the replica
    closed before answering on a fresh one, as it does.
    """
    key = (host, port)
    head = pool.request_head(key, method, target, headers, len(body))
    connection = pool.take_idle(key, tls)
    if connection is not None:
        try:
            return await StreamExchange(connection, pool, key).start(head, body, deadline)
        except ConnectionBroken as exc:
            if exc.response_started:
                raise
    connection = await pool.connect(key, deadline, tls)
    return await StreamExchange(connection, pool, key).start(head, body, deadline)


class UpstreamStream:
    """A response whose head has arrived and whose body is still coming."""

    def __init__(self, exchange: StreamExchange, status: int, headers: Headers) -> None:
        self.status = status
        self.headers = headers
        self._exchange = exchange

    async def next_chunk(self, idle_timeout_s: float) -> bytes:
        """Return the body bytes that arrived since the last call (b"": the clean end).

        Raises ConnectionBroken when the replica broke off mid-body, UpstreamTimeout when
        nothing came for `idle_timeout_s`.
        """
        return await self._exchange.next_chunk(idle_timeout_s)

    def abandon(self) -> None:
        """Close the connection unless the body is complete (the client went away)."""
        self._exchange.abandon()

    @property
    def complete(self) -> bool:
        """Return whether the whole body has arrived."""
        return self._exchange.done and self._exchange.failure is None


class StreamExchange(asyncio.Protocol):
    """The protocol of a connection for one streamed exchange (see the module docstring)."""

    def __init__(self, connection: PooledConnection, pool: UpstreamPool,
                 key: tuple[str, int]) -> None:
        self._connection = connection
        self._pool = pool
        self._key = key
        self._transport = cast(asyncio.Transport, connection.transport)
        self._loop = cast(asyncio.AbstractEventLoop, connection.loop)
        self._parser = httptools.HttpResponseParser(self)
        self._headers: Headers = []
        self._whole: list[bytes] | None = None  # the body of an answer read whole
        self._head_waiter: asyncio.Future[UpstreamResponse | UpstreamStream] | None = None
        self._chunks: deque[bytes] = deque()
        self._queued_bytes = 0
        self._chunk_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._response_started = False
        self.done = False
        self.failure: Exception | None = None

    async def start(self, head: bytes, body: bytes, deadline: float | None,
                    ) -> UpstreamResponse | UpstreamStream:
        """Send the request; return the stream once its head is in, or the whole answer.

        Raises ConnectionBroken or UpstreamTimeout (`deadline`: event-loop time, for the
        head or the whole answer) as the plain exchange does; the connection is closed then.
        """
        connection, transport = self._connection, self._transport
        if connection.closed or transport is None or transport.is_closing():
            raise ConnectionBroken("the connection is closed", response_started=False)
        waiter: asyncio.Future[UpstreamResponse | UpstreamStream] = self._loop.create_future()
        self._head_waiter = waiter
        transport.set_protocol(self)
        timer = None if deadline is None else self._loop.call_at(deadline, self._time_out)
        transport.write(head + body if len(body) <= 65536 else head)
        if len(body) > 65536:
            transport.write(body)
        try:
            return await waiter
        except BaseException:
            self._close()
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def next_chunk(self, idle_timeout_s: float) -> bytes:
        """See UpstreamStream.next_chunk."""
        while not self._chunks:
            if self.failure is not None:
                raise self.failure
            if self.done:
                return b""
            self._chunk_waiter = waiter = self._loop.create_future()
            timer = self._loop.call_later(idle_timeout_s, self._idle_too_long, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._chunk_waiter = None
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._queued_bytes = 0
        if self._reading_paused and not self.done:
            self._reading_paused = False
            self._transport.resume_reading()
        return data

    def abandon(self) -> None:
        """See UpstreamStream.abandon."""
        if not self.done or self.failure is not None:
            self._fail(ConnectionBroken("abandoned by the gateway", response_started=True))
            self._close()

    # asyncio.Protocol (while the exchange owns the transport)

    def data_received(self, data: bytes) -> None:
        self._response_started = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionBroken(f"malformed response from the replica: {exc}",
                                        self._response_started))
            self._close()

    def eof_received(self) -> bool:
        self._fail(ConnectionBroken("the replica closed the connection",
                                    self._response_started))
        self._connection.closed = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._connection.closed = True
        self._fail(ConnectionBroken(f"connection lost: {exc}" if exc else
                                    "the replica closed the connection",
                                    self._response_started))

    def pause_writing(self) -> None:
        self._connection.pause_writing()

    def resume_writing(self) -> None:
        self._connection.resume_writing()

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if not streams(status, self._headers):
            self._whole = []
            return
        waiter, self._head_waiter = self._head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(UpstreamStream(self, status, self._headers))

    def on_body(self, body: bytes) -> None:
        if self._whole is not None:
            self._whole.append(body)
            return
        self._chunks.append(body)
        self._queued_bytes += len(body)
        if self._queued_bytes > PAUSE_AT_BYTES and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.done = True
        keep_alive = self._parser.should_keep_alive()
        if keep_alive and not self._reading_paused:
            # The body is all here (queued if need be): the connection can serve again.
            self._transport.set_protocol(self._connection)
            self._pool.give_back(self._key, self._connection)
        else:
            self._close()
        if self._whole is not None:
            waiter, self._head_waiter = self._head_waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result(UpstreamResponse(self._parser.get_status_code(),
                                                   self._headers, b"".join(self._whole)))
        self._wake()

    # internals

    def _wake(self) -> None:
        waiter = self._chunk_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self.done and self.failure is None and self._head_waiter is None:
            return  # already complete: a later close says nothing about this exchange
        self.done = True
        self.failure = exc
        waiter, self._head_waiter = self._head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self._wake()

    def _time_out(self) -> None:
        self._fail(UpstreamTimeout("the replica did not answer in time"))
        self._close()

    def _idle_too_long(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            self._fail(UpstreamTimeout("the replica sent nothing for too long"))
            self._close()

    def _close(self) -> None:
        self._connection.close()
