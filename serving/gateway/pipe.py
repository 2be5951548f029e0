"""An in-memory byte pipe between two asyncio protocols in one process.

The gateway's upstream pool reaches a tunnel node's replica through one: one end is the
pool connection's transport, the other the tunnel stream's (swarm_protocol/tunnel.Stream),
so a request goes from the pool into the tunnel's frames with no socket between them. It
replaced a loopback port per tunnel replica, which cost four send/recv syscalls and two
event-loop wake-ups per request (measured in docs/benchmarks.md).

Either end's protocol may be an `asyncio.Protocol` or an `asyncio.BufferedProtocol`
(asyncio's SSLProtocol is one: node TLS runs end to end through the pipe and the tunnel).
`write` hands the bytes to the other end's protocol at once, as a socket pair would have
them read on the next loop turn; while that end's reading is paused they are held there,
and past HIGH_WATER_BYTES the writer's protocol is paused (`pause_writing`) until they
drain, as a socket's full write buffer would pause it (the tunnel stream then stops
granting credit, so a slow client slows only its own stream); `close` and `abort` end
both ends on the next turn, with EOF (a clean close) or a ConnectionResetError (an abort)
at the other end.
"""

from __future__ import annotations

import asyncio
from typing import Any

# Bytes held for a paused reader above which the writer's protocol is paused
# (pause_writing), and below which it resumes: what a socket's write buffer would do.
HIGH_WATER_BYTES = 256 * 1024
LOW_WATER_BYTES = 64 * 1024


def feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Give `data` to a protocol, buffered or not (what asyncio's transports do)."""
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buffer = memoryview(protocol.get_buffer(len(view)))
            count = min(len(buffer), len(view))
            if count == 0:
                raise RuntimeError("get_buffer() returned an empty buffer")
            buffer[:count] = view[:count]
            protocol.buffer_updated(count)
            view = view[count:]
    else:
        protocol.data_received(data)  # type: ignore[attr-defined]


class PipeEnd(asyncio.Transport):
    """One end of the pipe: what its protocol writes arrives at the other end's."""

    _start_tls_compatible = True  # asyncio's start_tls may wrap it

    def __init__(self, loop: asyncio.AbstractEventLoop, extra: dict[str, Any]) -> None:
        super().__init__(extra)
        self._loop = loop
        self._protocol: asyncio.BaseProtocol | None = None
        self.peer: PipeEnd | None = None
        self._closing = False
        self._lost = False
        self._reading_paused = False
        self._held: list[bytes] = []  # arrived while reading was paused
        self._held_bytes = 0
        self._eof_held = False  # the peer closed after what is held: EOF once it is read
        self._writer_paused = False  # the peer's protocol was told to pause_writing

    # asyncio.BaseTransport

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """End both ends: this protocol's connection is lost, the other sees EOF."""
        self._end(None)

    def abort(self) -> None:
        """End both ends at once: the other end's protocol sees a reset."""
        self._end(ConnectionResetError("the tunnel stream was reset"))

    def _force_close(self, exc: BaseException | None) -> None:  # asyncio's sslproto calls it
        self._end(exc if isinstance(exc, Exception) else None)

    # asyncio.ReadTransport

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._closing

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if self._held:
                self._loop.call_soon(self._deliver_held)

    # asyncio.WriteTransport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        peer = self.peer
        if self._closing or peer is None or peer._closing or not data:
            return
        peer._arrive(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.peer._held_bytes if self.peer is not None else 0  # held for its reader

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (LOW_WATER_BYTES, HIGH_WATER_BYTES)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    # internals

    def _arrive(self, data: bytes) -> None:
        if self._reading_paused or self._held:
            self._held.append(data)
            self._held_bytes += len(data)
            if self._held_bytes > HIGH_WATER_BYTES and not self._writer_paused:
                self._writer_paused = True
                self._peer_protocol_call("pause_writing")
        elif self._protocol is not None:
            feed(self._protocol, data)

    def _deliver_held(self) -> None:
        while self._held and not self._reading_paused and not self._closing \
                and self._protocol is not None:
            data = self._held.pop(0)
            self._held_bytes -= len(data)
            feed(self._protocol, data)
        if self._writer_paused and self._held_bytes <= LOW_WATER_BYTES:
            self._writer_paused = False
            self._peer_protocol_call("resume_writing")
        if self._eof_held and not self._held:
            self._eof_held = False
            self._eof()

    def _end(self, exc: Exception | None) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.call_soon(self._lose, None)
        peer = self.peer
        if peer is not None and not peer._closing:
            if exc is None:
                peer._loop.call_soon(peer._eof)
            else:
                peer._closing = True
                peer._loop.call_soon(peer._lose, exc)

    def _eof(self) -> None:
        if self._closing or self._protocol is None:
            return
        if self._held:  # reading is paused: the end of the stream waits behind its bytes
            self._eof_held = True
            return
        keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
        if not keep_open:
            self._end(None)

    def _peer_protocol_call(self, name: str) -> None:
        peer = self.peer
        if peer is not None and peer._protocol is not None and not peer._closing:
            getattr(peer._protocol, name)()

    def _lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._held.clear()
        self._held_bytes = 0
        if self._protocol is not None:
            self._protocol.connection_lost(exc)


def connect_pipe(loop: asyncio.AbstractEventLoop, left: asyncio.BaseProtocol,
                 right: asyncio.BaseProtocol, left_extra: dict[str, Any] | None = None,
                 right_extra: dict[str, Any] | None = None) -> tuple[PipeEnd, PipeEnd]:
    """Join two protocols with a pipe; call both connection_made at once (left first).

    Returns the (left, right) ends: each is its protocol's transport."""
    left_end, right_end = PipeEnd(loop, left_extra or {}), PipeEnd(loop, right_extra or {})
    left_end.peer, right_end.peer = right_end, left_end
    left_end.set_protocol(left)
    right_end.set_protocol(right)
    left.connection_made(left_end)
    right.connection_made(right_end)
    return left_end, right_end
