"""What the lean server (fast_http.py) writes: whole answers in one write, and streamed
answers (generate_stream, the OpenAI endpoints; streaming.py) as they arrive.

A stream goes out with chunked transfer-encoding, one write per chunk, waiting while the
client's socket is full (asyncio's pause_writing/resume_writing). An HTTP/1.0 client
cannot read chunked framing (RFC 9112 section 7: a server must not send it to one), so
it gets the bytes unframed and the connection closes at the stream's end, which is how
an HTTP/1.0 body without a Content-Length ends (uvicorn does the same).
"""

from __future__ import annotations

import asyncio
import http
from collections.abc import Callable

from serving.gateway.responses import Response
from serving.gateway.streaming import StreamBroken, StreamEnd, StreamingResponse

LAST_CHUNK = b"0\r\n\r\n"
INLINE_BODY_BYTES = 65536  # a body up to this size is copied into the head's write


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase)


STATUS_LINES = {status: _status_line(status) for status in range(100, 600)}


def write_response(transport: asyncio.Transport, response: Response, keep_alive: bool,
                   head_only: bool) -> None:
    """Write a whole answer with its Content-Length (and `connection: close` unless
    `keep_alive`); `head_only`: the head alone (a HEAD request)."""
    body = response.body
    head = [STATUS_LINES[response.status]]
    for name, value in response.headers:
        head += (name, b": ", value, b"\r\n")
    head.append(b"content-length: %d\r\n" % len(body)
                if keep_alive else b"content-length: %d\r\nconnection: close\r\n" % len(body))
    head.append(b"\r\n")
    if head_only or not body:
        transport.write(b"".join(head))
    elif len(body) <= INLINE_BODY_BYTES:
        head.append(body)
        transport.write(b"".join(head))  # one syscall; the copy is cheap at this size
    else:
        transport.write(b"".join(head))
        transport.write(body)


def stream_head(response: StreamingResponse, keep_alive: bool, chunked: bool) -> bytes:
    """Return a stream's head: chunked (kept alive or not), or unframed and closing."""
    head = [STATUS_LINES[response.status]]
    for name, value in response.headers:
        head += (name, b": ", value, b"\r\n")
    if not chunked:
        head.append(b"connection: close\r\n\r\n")
    elif keep_alive:
        head.append(b"transfer-encoding: chunked\r\n\r\n")
    else:
        head.append(b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n")
    return b"".join(head)


class StreamWriter:
    """One connection's flow control and the stream it is sending (one at a time).

    The protocol calls `pause`/`resume` from pause_writing/resume_writing and `lost`
    from connection_lost; `send` waits on them.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.paused = False  # the client's socket is full: wait before writing more
        self._drained: asyncio.Future[None] | None = None  # set when writing may go on
        self._streaming: StreamingResponse | None = None  # being sent now

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._wake()

    def lost(self) -> None:
        """The client went away: end the stream being sent (the replica's connection
        closes now, so the replica cancels the sequence) and wake the sender."""
        if self._streaming is not None:
            self._streaming.end(StreamEnd.CLIENT_GONE)
        self._wake()

    def _wake(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    async def send(self, transport_now: Callable[[], asyncio.Transport | None],
                   response: StreamingResponse, keep_alive: bool, chunked: bool) -> bool:
        """Send a stream: the head now, each chunk in one write as it arrives, waiting
        while the client reads slower than the replica writes. `transport_now` returns
        the connection's transport, None once the client has gone. Return False when
        the connection must close: the replica broke off (chunked: the terminating chunk
        is never sent, so the client sees an error, not a clean end), the client went
        away, or the stream was unframed (`chunked` False: its end is the close)."""
        transport = transport_now()
        if transport is None:
            response.end(StreamEnd.CLIENT_GONE)
            return False
        transport.write(stream_head(response, keep_alive, chunked))
        self._streaming = response
        try:
            while chunk := await response.next_chunk():
                if transport_now() is None:
                    return False
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                if self.paused:
                    self._drained = self._loop.create_future()
                    await self._drained
            if transport_now() is None or not chunked:
                return False
            transport.write(LAST_CHUNK)
            return True
        except StreamBroken:
            transport.close()  # after what is buffered: the stream just stops
            return False
        finally:
            self._streaming = None
            response.end(StreamEnd.CLIENT_GONE)  # changes nothing unless still open
