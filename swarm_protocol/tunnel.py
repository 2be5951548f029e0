"""The tunnel's stream layer: TCP byte streams multiplexed over one WebSocket connection.

A node behind NAT opens one WebSocket to each gateway (serving/agent/tunnel.py); the
gateway (serving/gateway/tunnel.py) opens a stream on it for each TCP connection its
upstream pool makes to one of the node's replicas, and the agent pipes that stream to the
replica's port on its own loopback. The bytes are the gateway's HTTP/1.1 exchanges,
unchanged: the tunnel knows nothing of HTTP, so keep-alive, binary bodies and the replica
key work as they do on a direct connection.

Wire format: each WebSocket binary message holds one or more frames, each
`kind (1 byte) | stream id (4 bytes) | payload length (4 bytes) | payload`, big-endian:

- OPEN (gateway -> agent): payload `port (2 bytes)`: connect the stream to 127.0.0.1:port.
- DATA: payload bytes, at most MAX_CHUNK_BYTES, never more than the credit the receiver
  granted for that stream (back-pressure: the receiver grants credit back only once it
  has written the bytes to its local socket and that socket is not backed up).
- CREDIT: payload `bytes (4 bytes)` more the receiver takes on that stream.
- CLOSE: the stream ended (either side); the other side closes its local socket.

Heartbeats are the WebSocket library's pings on the same connection. A peer that breaks
the rules (an unknown kind, DATA past its credit, a frame too large, too many streams)
loses the whole connection: TunnelProtocolError. Shapes: stream ids are u32 > 0, chosen
by the gateway; ports u16; byte counts u32.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from websockets.protocol import State

log = logging.getLogger("swarm.tunnel")

OPEN, DATA, CREDIT, CLOSE = 1, 2, 3, 4
_KINDS = frozenset({OPEN, DATA, CREDIT, CLOSE})
_HEADER = struct.Struct("!BII")
_PORT = struct.Struct("!H")
_COUNT = struct.Struct("!I")
MAX_CHUNK_BYTES = 256 * 1024  # one DATA frame's payload
WINDOW_BYTES = 4 * 1024 * 1024  # per stream, each way: bytes in flight before a CREDIT
MAX_MESSAGE_BYTES = 2 * 1024 * 1024  # frames are batched into messages up to this size
MAX_STREAMS = 1024  # per tunnel: more than a gateway's per-replica caps ever open
TUNNEL_PATH = "/tunnel"
NODE_HEADER = "X-Swarm-Node"
# A cut link is noticed within PING_INTERVAL_S + PING_TIMEOUT_S on both ends: requests in
# flight on it then fail as connection errors (the gateway retries them elsewhere) well
# before their own deadline.
PING_INTERVAL_S = 2.0
PING_TIMEOUT_S = 4.0
# After a ping timeout, how long to wait for the peer's closing handshake: a silent link
# never brings one, and websockets' 10 s default would keep a dead tunnel (and its node's
# replicas) up for 14-16 s instead of the ping window.
CLOSE_TIMEOUT_S = 1.0


class TunnelProtocolError(Exception):
    """The peer broke the framing rules: the connection is closed."""


class MessageSocket(Protocol):
    """What the mux needs of a WebSocket connection (websockets' asyncio connections):
    `recv`, and for sending the sans-I/O `protocol` and the `transport` under it."""

    @property
    def protocol(self) -> Any: ...

    @property
    def transport(self) -> Any: ...

    async def recv(self) -> Any: ...


def encode(kind: int, stream_id: int, payload: bytes = b"") -> bytes:
    """Return one frame."""
    return _HEADER.pack(kind, stream_id, len(payload)) + payload


def decode(message: bytes) -> Iterable[tuple[int, int, bytes]]:
    """Yield (kind, stream id, payload) of each frame in one message (TunnelProtocolError
    on a truncated or unknown frame)."""
    view = memoryview(message)
    offset, size = 0, len(message)
    while offset < size:
        if size - offset < _HEADER.size:
            raise TunnelProtocolError("truncated frame header")
        kind, stream_id, length = _HEADER.unpack_from(view, offset)
        offset += _HEADER.size
        if kind not in _KINDS or length > MAX_CHUNK_BYTES or offset + length > size:
            raise TunnelProtocolError(f"bad frame: kind {kind}, {length} bytes")
        yield kind, stream_id, bytes(view[offset:offset + length])
        offset += length


def set_nodelay(transport: Any) -> None:
    """Turn Nagle off on a TCP transport (uvloop leaves it on for some sockets): a small
    write held for an ACK would add a delayed-ACK wait to a request."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Stream(asyncio.Protocol):
    """One multiplexed stream, and the asyncio protocol of its local TCP socket."""

    def __init__(self, mux: Mux, stream_id: int) -> None:
        self._mux = mux
        self.stream_id = stream_id
        self._transport: asyncio.Transport | None = None
        self._send_credit = mux.window_bytes  # what we may still send the peer
        self._received_unacked = 0  # written locally, not yet granted back
        self._peer_may_send = mux.window_bytes  # what the peer may still send us
        self._pending: deque[bytes] = deque()  # read locally, waiting for credit
        self._early: list[bytes] = []  # from the peer before the local socket connected
        self._write_paused = False
        self._reading_paused = False
        self.closed = False

    # the local socket (asyncio.Protocol)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's quack alike
        set_nodelay(transport)
        for data in self._early:
            transport.write(data)  # type: ignore[attr-defined]
        self._early.clear()
        if self.closed:  # the peer ended the stream while it connected
            transport.close()
        else:
            self._grant()

    def data_received(self, data: bytes) -> None:
        if self._pending or len(data) > self._send_credit:
            self._pending.append(data)
            self._flush()
        else:
            self._send_credit -= len(data)
            self._mux.send_data(self.stream_id, data)

    def eof_received(self) -> bool:
        return False  # HTTP/1.1 needs no half-close: close the stream

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self._mux.stream_ended(self, notify_peer=True)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._grant()

    # frames from the peer

    def on_data(self, data: bytes) -> None:
        """Write the peer's bytes locally (TunnelProtocolError when past its credit)."""
        if len(data) > self._peer_may_send:
            raise TunnelProtocolError(f"stream {self.stream_id}: data past its credit")
        self._peer_may_send -= len(data)
        if self._transport is None:
            self._early.append(data)  # bounded by the credit: at most one window
        else:
            self._transport.write(data)
        self._received_unacked += len(data)
        self._grant()

    def on_credit(self, count_bytes: int) -> None:
        """Take more credit from the peer and send what waited for it."""
        self._send_credit += count_bytes
        self._flush()

    def on_close(self) -> None:
        """The peer ended the stream: close the local socket once its writes are out."""
        if not self.closed:
            self.closed = True
            self._mux.stream_ended(self, notify_peer=False)
            if self._transport is not None:
                self._transport.close()

    def abort(self) -> None:
        """The tunnel is gone: drop the local socket at once (its peer sees a reset)."""
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    # internals

    def _grant(self) -> None:
        # Half a window at a time: small exchanges send no CREDIT frames at all.
        if self._write_paused or self._transport is None \
                or self._received_unacked < self._mux.window_bytes // 2:
            return
        count, self._received_unacked = self._received_unacked, 0
        self._peer_may_send += count
        self._mux.send_frame(encode(CREDIT, self.stream_id, _COUNT.pack(count)))

    def _flush(self) -> None:
        while self._pending and self._send_credit > 0:
            data = self._pending.popleft()
            if len(data) > self._send_credit:
                self._pending.appendleft(data[self._send_credit:])
                data = data[:self._send_credit]
            self._send_credit -= len(data)
            self._mux.send_data(self.stream_id, data)
        if self._transport is None:
            return
        if self._pending and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
        elif not self._pending and self._reading_paused:
            self._reading_paused = False
            self._transport.resume_reading()


Opener = Callable[["Mux", int, int], None]  # (mux, stream id, port): connect it locally


class Mux:
    """The streams of one tunnel connection; `run()` serves it until it closes."""

    def __init__(self, socket: MessageSocket, opener: Opener | None = None, *,
                 window_bytes: int = WINDOW_BYTES, max_streams: int = MAX_STREAMS) -> None:
        self._socket = socket
        self._opener = opener  # None: this side opens streams (the gateway)
        self.window_bytes = window_bytes
        self.max_streams = max_streams
        self.streams: dict[int, Stream] = {}
        self._next_id = 1
        self._out: deque[bytes] = deque()
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()
        self.closed = False

    async def run(self) -> None:
        """Read frames until the connection ends; then abort every stream."""
        try:
            while True:
                message = await self._socket.recv()
                if not isinstance(message, bytes):
                    raise TunnelProtocolError("text message on the tunnel")
                for kind, stream_id, payload in decode(message):
                    self._dispatch(kind, stream_id, payload)
        finally:
            self.closed = True
            self._out.clear()
            for stream in list(self.streams.values()):
                stream.abort()
            self.streams.clear()

    def new_stream(self, port: int) -> Stream:
        """Open a stream to `port` on the peer's loopback (the gateway side)."""
        if self.closed or len(self.streams) >= self.max_streams:
            raise ConnectionError("the tunnel is closed or has too many streams")
        stream_id = self._next_id
        self._next_id = stream_id + 1 if stream_id < 0xFFFFFFFF else 1
        stream = Stream(self, stream_id)
        self.streams[stream_id] = stream
        self.send_frame(encode(OPEN, stream_id, _PORT.pack(port)))
        return stream

    # used by streams

    def send_data(self, stream_id: int, data: bytes) -> None:
        """Queue DATA frames for `data`, cut at MAX_CHUNK_BYTES."""
        for start in range(0, len(data), MAX_CHUNK_BYTES):
            self.send_frame(encode(DATA, stream_id, data[start:start + MAX_CHUNK_BYTES]))

    def send_frame(self, frame: bytes) -> None:
        """Queue one frame; the writer sends what is queued as one message."""
        if self.closed:
            return
        self._out.append(frame)
        if not self._flush_scheduled:
            # Once this loop iteration is done: frames of every stream that had data in it
            # leave as one message (fewer syscalls under load, one hop less than a task).
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def stream_ended(self, stream: Stream, notify_peer: bool) -> None:
        """Forget a stream; tell the peer when it ended on this side."""
        if self.streams.pop(stream.stream_id, None) is not None and notify_peer:
            self.send_frame(encode(CLOSE, stream.stream_id))

    # internals

    def _dispatch(self, kind: int, stream_id: int, payload: bytes) -> None:
        stream = self.streams.get(stream_id)
        if kind == OPEN:
            self._open(stream_id, payload)
        elif stream is None:
            if kind == DATA:  # the stream ended here while this was on its way
                self.send_frame(encode(CLOSE, stream_id))
        elif kind == DATA:
            stream.on_data(payload)
        elif kind == CREDIT:
            if len(payload) != _COUNT.size:
                raise TunnelProtocolError("bad CREDIT frame")
            stream.on_credit(_COUNT.unpack(payload)[0])
        else:
            stream.on_close()

    def _open(self, stream_id: int, payload: bytes) -> None:
        if self._opener is None or len(payload) != _PORT.size:
            raise TunnelProtocolError("unexpected OPEN frame")
        if stream_id in self.streams or len(self.streams) >= self.max_streams:
            raise TunnelProtocolError(f"OPEN of stream {stream_id}: in use or too many")
        self.streams[stream_id] = Stream(self, stream_id)
        self._opener(self, stream_id, _PORT.unpack(payload)[0])

    def _flush(self) -> None:
        """Send the queued frames now, as few messages as MAX_MESSAGE_BYTES allows.

        Written through websockets' sans-I/O protocol and the transport under it (what its
        own `send` does, without a coroutine per message); the credit windows bound what
        can pile up in the transport's buffer."""
        self._flush_scheduled = False
        protocol, transport = self._socket.protocol, self._socket.transport
        while self._out:
            if protocol.state is not State.OPEN or transport.is_closing():
                self._out.clear()  # closing: run() ends and aborts every stream
                return
            batch: list[bytes] = [self._out.popleft()]
            size = len(batch[0])
            while self._out and size + len(self._out[0]) <= MAX_MESSAGE_BYTES:
                frame = self._out.popleft()
                batch.append(frame)
                size += len(frame)
            protocol.send_binary(batch[0] if len(batch) == 1 else b"".join(batch))
            for data in protocol.data_to_send():
                transport.write(data)
