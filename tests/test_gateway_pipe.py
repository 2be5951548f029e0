"""The in-memory pipe (serving/gateway/pipe.py) and the upstream pool's in-process hosts,
plain and with TLS running end to end through the pipe (asyncio's SSLProtocol at both ends).
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from serving.gateway.node_tls import PinMismatch, key_pin_of, upstream_tls
from serving.gateway.pipe import HIGH_WATER_BYTES, PipeEnd, connect_pipe, feed
from serving.gateway.upstream import ConnectFailed, ConnectionBroken, UpstreamPool
from tests.certs import certificate, new_key, pem

NODE_ADDRESS = "10.255.0.7"  # only a name in the certificate: nothing is dialled
HOST = "node-7.tunnel.invalid"  # an in-process host, as serving/gateway/tunnel.py names them


class Recorder(asyncio.Protocol):
    """Keeps what it receives and how its connection ended."""

    def __init__(self, keep_open_on_eof: bool = False) -> None:
        self.transport: asyncio.Transport | None = None
        self.received = bytearray()
        self.eof = False
        self.lost: list[Exception | None] = []
        self._keep_open = keep_open_on_eof

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data

    def eof_received(self) -> bool:
        self.eof = True
        return self._keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


class Buffered(asyncio.BufferedProtocol):
    """Gives out 3-byte buffers: a write must be fed in several pieces."""

    def __init__(self) -> None:
        self.received = bytearray()
        self._buffer = bytearray(3)

    def get_buffer(self, sizehint: int) -> bytearray:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.received += self._buffer[:nbytes]


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_bytes_cross_both_ways_at_once() -> None:
    left, right = Recorder(), Recorder()
    left_end, right_end = connect_pipe(asyncio.get_running_loop(), left, right)
    left_end.write(b"ping")
    right_end.write(memoryview(b"pong"))
    assert (bytes(right.received), bytes(left.received)) == (b"ping", b"pong")
    assert left_end.get_write_buffer_size() == 0


async def test_a_close_is_eof_at_the_other_end_then_both_are_lost() -> None:
    left, right = Recorder(), Recorder()
    left_end, _ = connect_pipe(asyncio.get_running_loop(), left, right)
    left_end.write(b"last words")
    left_end.close()
    left_end.write(b"after close")  # dropped, as a closed socket's transport drops it
    await settle()
    assert right.received == b"last words" and right.eof
    assert left.lost == [None] and right.lost == [None]


async def test_an_abort_is_a_reset_at_the_other_end() -> None:
    left, right = Recorder(), Recorder()
    left_end, _ = connect_pipe(asyncio.get_running_loop(), left, right)
    left_end.abort()
    await settle()
    assert not right.eof and isinstance(right.lost[0], ConnectionResetError)
    assert left.lost == [None]


async def test_paused_reading_holds_bytes_until_resumed_in_order() -> None:
    left, right = Recorder(), Recorder()
    left_end, right_end = connect_pipe(asyncio.get_running_loop(), left, right)
    right_end.pause_reading()
    left_end.write(b"one ")
    left_end.write(b"two")
    await settle()
    assert right.received == b"" and not right_end.is_reading()
    right_end.resume_reading()
    left_end.write(b" three")  # must not overtake what was held
    await settle()
    assert right.received == b"one two three"


async def test_a_close_waits_behind_the_bytes_a_paused_reader_holds() -> None:
    left, right = Recorder(), Recorder()
    left_end, right_end = connect_pipe(asyncio.get_running_loop(), left, right)
    right_end.pause_reading()
    left_end.write(b"held")
    left_end.close()
    await settle()
    assert right.received == b"" and not right.eof  # nothing read yet, not even the end
    right_end.resume_reading()
    await settle()
    assert right.received == b"held" and right.eof and right.lost == [None]


async def test_a_buffered_protocol_is_fed_in_its_buffers_pieces() -> None:
    buffered = Buffered()
    feed(buffered, b"0123456789")
    assert buffered.received == b"0123456789"


def node_identity(tmp_path: Path) -> tuple[str, ssl.SSLContext, str]:
    """Return (the CA's PEM, a server context for the node's certificate, its pin)."""
    ca_key, node_key = new_key(), new_key()
    ca = certificate(ca_key.public_key(), ca_key, "node CA", ca=True)
    node = certificate(node_key.public_key(), ca_key, "node", issuer=ca.subject,
                       sans=[NODE_ADDRESS], server_auth=True)
    (tmp_path / "node.crt").write_text(pem(node))
    (tmp_path / "node.key").write_bytes(node_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "node.crt", tmp_path / "node.key")
    return pem(ca), server, key_pin_of(node.public_bytes(serialization.Encoding.DER))


class Echo(asyncio.Protocol):
    """A one-request HTTP replica: answers the body it got (Content-Length bodies only)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport, self.data = transport, b""

    def data_received(self, data: bytes) -> None:
        self.data += data
        head, _, body = self.data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        if len(body) == length:
            self.data = b""
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                 % (length, body))


def serve_in_process(pool: UpstreamPool, server_tls: ssl.SSLContext | None) -> list[int]:
    """Make `HOST` an in-process host of `pool` whose ports echo; return the ports
    dialled."""
    dialled: list[int] = []
    loop = asyncio.get_running_loop()

    def dial(port: int, protocol: asyncio.BaseProtocol) -> asyncio.Transport:
        dialled.append(port)
        replica: asyncio.BaseProtocol = Echo()
        if server_tls is not None:
            replica = sslproto.SSLProtocol(loop, replica, server_tls, None, server_side=True)
        return connect_pipe(loop, replica, protocol)[1]

    pool.local_hosts[HOST] = dial
    return dialled


async def test_the_pool_reaches_an_in_process_host_and_reuses_the_connection() -> None:
    pool = UpstreamPool()
    dialled = serve_in_process(pool, None)
    for body in (b"first", b"second"):
        answer = await pool.request(HOST, 8101, b"POST", b"/x", [], body)
        assert (answer.status, answer.body) == (200, body)
    assert dialled == [8101] and pool.connections_opened == 1
    pool.close()


async def test_tls_runs_end_to_end_through_the_pipe_and_the_pin_is_checked(
        tmp_path: Path) -> None:
    ca_pem, server_tls, pin = node_identity(tmp_path)
    pool = UpstreamPool()
    serve_in_process(pool, server_tls)
    tls = upstream_tls(ca_pem, pin, NODE_ADDRESS)
    answer = await pool.request(HOST, 8101, b"POST", b"/x", [], b"secret", tls=tls)
    assert (answer.status, answer.body) == (200, b"secret")
    [connection] = pool._idle[(HOST, 8101)]
    assert connection.transport is not None
    assert not isinstance(connection.transport, PipeEnd)  # TLS's transport, over the pipe
    assert connection.transport.get_extra_info("ssl_object") is not None

    wrong_pin = upstream_tls(ca_pem, "0" * 64, NODE_ADDRESS)
    with pytest.raises(ConnectFailed) as refused:
        await pool.request(HOST, 8102, b"POST", b"/x", [], b"", tls=wrong_pin)
    assert isinstance(refused.value.__cause__, PinMismatch)
    wrong_name = upstream_tls(ca_pem, pin, "10.255.0.8")
    with pytest.raises(ConnectFailed, match="certificate"):
        await pool.request(HOST, 8103, b"POST", b"/x", [], b"", tls=wrong_name)
    pool.close()


async def test_a_dial_that_fails_is_a_connect_failure_and_a_reset_a_broken_connection(
        ) -> None:
    pool = UpstreamPool()

    def no_tunnel(port: int, protocol: asyncio.BaseProtocol) -> asyncio.Transport:
        raise ConnectionError("node 7 has no tunnel to this gateway")

    pool.local_hosts[HOST] = no_tunnel
    with pytest.raises(ConnectFailed, match="no tunnel"):
        await pool.request(HOST, 8101, b"GET", b"/", [])

    ends: list[PipeEnd] = []

    def silent(port: int, protocol: asyncio.BaseProtocol) -> asyncio.Transport:
        ends.append(connect_pipe(asyncio.get_running_loop(), Recorder(), protocol)[0])
        return ends[-1].peer  # type: ignore[return-value]

    pool.local_hosts[HOST] = silent
    request = asyncio.ensure_future(pool.request(HOST, 8101, b"GET", b"/", []))
    while not ends:
        await asyncio.sleep(0)
    ends[0].abort()  # the tunnel went away mid-request
    with pytest.raises(ConnectionBroken):
        await request


async def test_an_in_process_host_without_its_dial_fails_at_once_without_dns() -> None:
    pool = UpstreamPool()  # e.g. its tunnel dropped while a request was on its way
    with pytest.raises(ConnectFailed, match="not reachable now"):
        await pool.request(HOST, 8101, b"GET", b"/", [])


async def test_a_tls_handshake_given_up_closes_its_stream() -> None:
    pool = UpstreamPool(connect_timeout_s=0.2)
    replicas: list[Recorder] = []

    def mute(port: int, protocol: asyncio.BaseProtocol) -> asyncio.Transport:
        replicas.append(Recorder())  # takes the ClientHello, never answers
        return connect_pipe(asyncio.get_running_loop(), replicas[-1], protocol)[1]

    pool.local_hosts[HOST] = mute
    tls = upstream_tls("", "0" * 64, NODE_ADDRESS)
    with pytest.raises(ConnectFailed, match="timed out"):
        await pool.request(HOST, 8101, b"GET", b"/", [], tls=tls)
    await settle()
    assert replicas[0].received and replicas[0].lost  # the stream went with the attempt


class Pausable(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.paused: list[bool] = []

    def pause_writing(self) -> None:
        self.paused.append(True)

    def resume_writing(self) -> None:
        self.paused.append(False)


async def test_a_paused_reader_pauses_the_writer_past_the_high_water_mark() -> None:
    writer, reader = Pausable(), Recorder()
    writer_end, reader_end = connect_pipe(asyncio.get_running_loop(), writer, reader)
    reader_end.pause_reading()  # a slow client behind the pool's connection
    writer_end.write(b"x" * HIGH_WATER_BYTES)
    assert writer.paused == []
    writer_end.write(b"y")  # past the mark: the tunnel stream stops granting credit
    assert writer.paused == [True] and writer_end.get_write_buffer_size() > HIGH_WATER_BYTES
    reader_end.resume_reading()
    await settle()
    assert writer.paused == [True, False] and len(reader.received) == HIGH_WATER_BYTES + 1
