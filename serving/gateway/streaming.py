"""A replica's answer relayed while it is generated: `StreamingResponse`, and its ASGI sender.

generate_stream answers with Server-Sent Events, one per text delta, over seconds. The
gateway sends the head as soon as the replica's head is in and each chunk the moment it
arrives, without buffering the body. From the head on there is no retry (the client has
bytes already): a replica that breaks off ends the client's stream without its end (no
terminating chunk; the client sees an error, never a clean but truncated answer). The
lease on the replica is held until the stream ends, so the balancer counts running
sequences, and is released once: SUCCESS (complete), FAILURE (the replica broke off),
TIMEOUT (nothing for the route's request timeout), CANCELLED (the client went away).

The transports (the ASGI sender below, the lean server's `_stream` in fast_http.py) only
call `next_chunk` until b"" and `end`; anything that has the same three members (status,
headers, next_chunk/end) can be sent the same way, e.g. a stream translated to another
format (the OpenAI endpoints) that reads `StreamSummary.last_event` for the usage.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from serving.gateway.responses import Headers, Receive, Send
from serving.gateway.upstream import UpstreamError, UpstreamTimeout
from serving.gateway.upstream_stream import UpstreamStream

# What the client may see of a streamed head (framing is the transport's own).
STREAM_HEADERS = frozenset({b"content-type", b"cache-control", b"x-accel-buffering",
                            b"content-encoding"})
TAIL_BYTES = 64 * 1024  # kept of the body's end, for the last event (usage) at the end


class StreamEnd(StrEnum):
    """How a relayed stream ended."""

    COMPLETE = "complete"
    BROKEN = "broken"  # the replica broke off (reset, EOF, garbage) mid-body
    TIMEOUT = "timeout"  # the replica sent nothing for the idle limit
    CLIENT_GONE = "client_gone"


class StreamBroken(Exception):
    """The stream cannot be completed: end the client's answer without its terminator."""


@dataclass(frozen=True, slots=True)
class StreamSummary:
    """What the end callbacks learn: the outcome, body bytes relayed, seconds from the
    replica's head to the first body chunk (None: none came), and the last SSE event's
    data (b"" when the body held no `data:` line, or it was not in the last TAIL_BYTES)."""

    outcome: StreamEnd
    status: int
    body_bytes: int
    first_chunk_s: float | None
    last_event: bytes


class StreamingResponse:
    """Status and headers now; the body with `next_chunk` until b""; `end` once."""

    def __init__(self, status: int, headers: Headers, upstream: UpstreamStream,
                 idle_timeout_s: float, clock: Callable[[], float]) -> None:
        """`idle_timeout_s`: how long a chunk may take to come; `clock` (seconds) times
        the first chunk from now (the head)."""
        self.status = status
        self.headers = [h for h in headers if h[0] in STREAM_HEADERS]
        self.on_first_chunk: list[Callable[[], None]] = []  # before it goes to the client
        self.on_end: list[Callable[[StreamSummary], None]] = []
        self.outcome: StreamEnd | None = None
        self._upstream = upstream
        self._idle_timeout_s = idle_timeout_s
        self._started_s = clock()
        self._clock = clock
        self._first_chunk_s: float | None = None
        self._tail: deque[bytes] = deque()
        self._tail_bytes = 0
        self._body_bytes = 0

    async def next_chunk(self) -> bytes:
        """Return the next body bytes; b"" at the clean end. Raises StreamBroken once the
        stream has ended any other way (the replica broke off or went quiet, or `end`)."""
        if self.outcome is not None and self.outcome is not StreamEnd.COMPLETE:
            raise StreamBroken(f"the stream ended: {self.outcome}")
        try:
            data = await self._upstream.next_chunk(self._idle_timeout_s)
        except UpstreamTimeout as exc:
            self.end(StreamEnd.TIMEOUT)
            raise StreamBroken("the replica sent nothing for too long") from exc
        except UpstreamError as exc:
            self.end(StreamEnd.BROKEN)
            raise StreamBroken(f"the replica broke off: {exc}") from exc
        if not data:
            self.end(StreamEnd.COMPLETE)
            return b""
        if self._first_chunk_s is None:
            self._first_chunk_s = self._clock() - self._started_s
            for callback in self.on_first_chunk:
                callback()
        self._keep_tail(data)
        return data

    def end(self, outcome: StreamEnd) -> None:
        """End the stream (once; later calls change nothing): close the replica's
        connection unless complete, then call the `on_end` callbacks."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        if outcome is not StreamEnd.COMPLETE:
            self._upstream.abandon()
        summary = StreamSummary(outcome, self.status, self._body_bytes, self._first_chunk_s,
                                self.last_event())
        for callback in self.on_end:
            callback(summary)

    def last_event(self) -> bytes:
        """Return the data of the last Server-Sent Event relayed so far (b"": none); an
        OpenAI stream's terminator (`data: [DONE]`) is no event: the usage comes before."""
        tail = b"".join(self._tail).replace(b"\r\n", b"\n")
        for event in reversed(tail.split(b"\n\n")):
            lines = [line[5:].lstrip(b" ") for line in event.split(b"\n")
                     if line.startswith(b"data:")]
            if lines and lines != [b"[DONE]"]:
                return b"\n".join(lines)
        return b""

    def _keep_tail(self, data: bytes) -> None:
        self._body_bytes += len(data)
        self._tail.append(data)
        self._tail_bytes += len(data)
        while self._tail_bytes - len(self._tail[0]) >= TAIL_BYTES:
            self._tail_bytes -= len(self._tail.popleft())


async def send_stream(send: Send, receive: Receive, response: StreamingResponse) -> None:
    """Send a stream over ASGI, each chunk as one `more_body` message.

    A client that disconnects ends the stream at once (a task watches `receive`). When the
    replica breaks off, StreamBroken is raised after the head: the server then closes the
    connection without the body's end, so the client sees an error (uvicorn does so).
    """
    loop = asyncio.get_running_loop()
    watcher = loop.create_task(_end_on_disconnect(receive, response))
    try:
        await send({"type": "http.response.start", "status": response.status,
                    "headers": response.headers})
        while chunk := await response.next_chunk():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    except StreamBroken:
        if response.outcome is StreamEnd.CLIENT_GONE:
            return  # nobody to tell
        raise
    finally:
        watcher.cancel()
        response.end(StreamEnd.CLIENT_GONE)  # changes nothing unless still open


async def _end_on_disconnect(receive: Receive, response: StreamingResponse) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    response.end(StreamEnd.CLIENT_GONE)
