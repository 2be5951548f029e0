"""The tunnel on loopback: the gateway's tunnel server, the agent's client, a replica-like
HTTP server behind it, and the gateway's own upstream pool in front, over real sockets.

The node's "replica" listens on 127.0.0.1 only; the gateway's pool reaches it in process,
through the host name its TunnelRegistry gives the replica in the routing table.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus

from serving.agent.tunnel import TunnelClient, backoff_s
from serving.balancing import BalancerConfig
from serving.gateway.deployments import Fleet
from serving.gateway.forwarding import Forwarder, UpstreamRequest
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.pipe import PipeEnd
from serving.gateway.routes import DeploymentRoute, ReplicaRoute, RouteTable, VersionInfo
from serving.gateway.tunnel import (
    TunnelServer,
    add_tunnel_arguments,
    attach_tunnels,
    key_digest,
    tunnel_host,
)
from serving.gateway.upstream import UpstreamError, UpstreamPool
from swarm_protocol.tunnel import NODE_HEADER, TUNNEL_PATH, WINDOW_BYTES
from tests.certs import self_signed_files

NODE_ID = 7
KEY = "k" * 64
DEADLINE_S = 30.0


async def eventually(condition: object, what: str, timeout_s: float = DEADLINE_S) -> None:
    """Wait (on the loop) until `condition()` is truthy; fail after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


class EchoReplica:
    """HTTP/1.1 keep-alive server: answers each request with its body (or, for
    /stall, reads nothing at all until released)."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.release = asyncio.Event()
        self.requests = 0
        self.stalled = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"POST /stall"):
                    self.stalled += 1
                    await self.release.wait()
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.requests += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@dataclass
class Lab:
    fleet: Fleet
    server: TunnelServer
    replica: EchoReplica
    replica_port: int
    url: str
    pool: UpstreamPool

    def target(self) -> tuple[str, int] | None:
        runtime = self.fleet.deployments["m"]
        if not runtime.route.replicas:
            return None
        replica = runtime.route.replicas[0]
        return replica.host, replica.port

    async def post(self, body: bytes, path: bytes = b"/echo") -> bytes:
        target = self.target()
        assert target is not None, "the tunnel replica is not in the table"
        response = await self.pool.request(target[0], target[1], b"POST", path, [], body)
        assert response.status == 200
        return response.body


def table(replica_port: int) -> RouteTable:
    replica = ReplicaRoute(replica_id=1, host="10.255.255.1", port=replica_port,
                           replica_key="rk", version=1, node_id=NODE_ID, tunnel=True)
    route = DeploymentRoute(name="m", deployment_id=1, weights={1: 1.0},
                            versions={1: VersionInfo("pytorch", [], [])}, replicas=(replica,))
    return RouteTable(revision="1", deployments={"m": route},
                      tunnels={NODE_ID: key_digest(KEY)})


async def start_server(fleet: Fleet, pool: UpstreamPool, port: int = 0) -> TunnelServer:
    server = TunnelServer(fleet, pool, "127.0.0.1", port)
    await server.start()
    fleet.apply(fleet.table)
    return server


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    replica = EchoReplica()
    replica_port = await replica.start()
    fleet = Fleet(random.Random(1), BalancerConfig())
    fleet.apply(table(replica_port))
    pool = UpstreamPool()
    server = await start_server(fleet, pool)
    yield Lab(fleet, server, replica, replica_port,
              f"ws://127.0.0.1:{server.port}{TUNNEL_PATH}", pool)
    pool.close()
    await server.aclose()
    replica.close()


@pytest.fixture
async def client(lab: Lab) -> AsyncIterator[TunnelClient]:
    agent = TunnelClient(lab.url, NODE_ID, KEY, {lab.replica_port})
    task = asyncio.ensure_future(agent.run())
    await eventually(lab.target, "the replica routed through the tunnel")
    yield agent
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_without_a_tunnel_the_node_s_replica_is_not_in_the_table(lab: Lab) -> None:
    assert lab.fleet.table.deployments["m"].replicas  # the portal lists it...
    assert lab.target() is None  # ...but this gateway cannot reach it


async def test_concurrent_requests_each_get_their_own_binary_answer(
        lab: Lab, client: TunnelClient) -> None:
    bodies = [os.urandom(1000 + i) + bytes([i]) * 7 for i in range(64)]
    answers = await asyncio.gather(*(lab.post(body) for body in bodies))
    assert answers == bodies
    # Reached in process: the pool's connections are pipes into the tunnel, not sockets.
    assert lab.target() == (tunnel_host(NODE_ID), lab.replica_port)
    assert tunnel_host(NODE_ID) in lab.pool.local_hosts


async def test_a_big_binary_body_crosses_whole(lab: Lab, client: TunnelClient) -> None:
    body = os.urandom(24 * 1024 * 1024)
    answer = await lab.post(body)
    assert hashlib.sha256(answer).digest() == hashlib.sha256(body).digest()


class Sink(asyncio.Protocol):
    """A raw connection through the pool's in-process dial: keeps what comes back."""

    def __init__(self) -> None:
        self.transport: PipeEnd | None = None
        self.received = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, PipeEnd)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data


async def test_a_replica_that_reads_nothing_stops_the_sender_after_a_window(
        lab: Lab, client: TunnelClient) -> None:
    target = lab.target()
    assert target is not None
    sink = Sink()
    lab.pool.local_hosts[target[0]](target[1], sink)
    assert sink.transport is not None and sink.transport.peer is not None
    stream_end = sink.transport.peer  # the tunnel stream's side of the pipe
    body_bytes = 64 * 1024 * 1024
    sink.transport.write(b"POST /stall HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % body_bytes)
    chunk = b"x" * (1024 * 1024)
    for _ in range(body_bytes // len(chunk)):
        sink.transport.write(chunk)

    def waiting_bytes() -> int:  # held in the gateway: not yet sent through the tunnel
        stream = stream_end.get_protocol()
        return sum(map(len, stream_end._held)) + sum(map(len, stream._pending))  # type: ignore

    last, unchanged = -1, 0
    while unchanged < 100:  # about 1 s without progress
        await asyncio.sleep(0.01)
        unchanged, last = (unchanged + 1, last) if waiting_bytes() == last \
            else (0, waiting_bytes())
    assert not stream_end.is_reading()  # the stream stopped taking the pool's bytes
    # The window plus what the agent's socket buffers hold, nowhere near the whole body.
    assert body_bytes - last < 3 * WINDOW_BYTES + 32 * 1024 * 1024, body_bytes - last
    lab.replica.release.set()
    await eventually(lambda: sink.received.startswith(b"HTTP/1.1 200 OK")
                     and sink.received.endswith(chunk[:1024]), "the whole echo")
    sink.transport.close()


async def test_a_wrong_key_is_refused_before_the_handshake(lab: Lab) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(lab.url, additional_headers={
                "Authorization": "Bearer " + "x" * 64, NODE_HEADER: str(NODE_ID)}):
            pass
    assert refused.value.response.status_code == 401
    agent = TunnelClient(lab.url, NODE_ID, "wrong", {lab.replica_port})
    task = asyncio.ensure_future(agent.run())
    await eventually(lambda: agent.refusals >= 2, "two refused tries (it keeps trying)")
    assert agent.connections == 0
    assert lab.server.registry.connected() == set() and lab.target() is None
    task.cancel()


async def test_an_unknown_node_and_a_wrong_path_are_refused(lab: Lab) -> None:
    for url, node in ((lab.url, "8"), (lab.url.replace(TUNNEL_PATH, "/other"), str(NODE_ID))):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url, additional_headers={"Authorization": f"Bearer {KEY}",
                                                        NODE_HEADER: node}):
                pass
        assert refused.value.response.status_code in (401, 404)


async def test_a_port_outside_the_replica_range_is_not_connected(lab: Lab) -> None:
    agent = TunnelClient(lab.url, NODE_ID, KEY, {lab.replica_port + 1})  # not the replica's
    task = asyncio.ensure_future(agent.run())
    await eventually(lab.target, "the tunnel")
    with pytest.raises(UpstreamError):
        await lab.post(b"hello")
    assert lab.replica.requests == 0
    task.cancel()


async def test_a_dropped_tunnel_takes_the_replica_out_at_once_and_back_when_it_returns(
        lab: Lab, client: TunnelClient) -> None:
    assert await lab.post(b"before") == b"before"
    target = lab.target()
    assert target is not None
    # The gateway goes away (its tunnel server stops): the node's replica leaves the table.
    await lab.server.aclose()
    await eventually(lambda: lab.target() is None, "the replica out of the table")
    # In flight or not, connections to its tunnel host now fail as connection errors.
    with pytest.raises(UpstreamError):
        await lab.pool.request(target[0], target[1], b"POST", b"/echo", [], b"x")
    # A gateway on the same port again: the agent reconnects (back-off) and serves.
    port = int(lab.url.split(":")[2].split("/")[0])
    lab.server = await start_server(lab.fleet, lab.pool, port)
    await eventually(lab.target, "the replica back after the tunnel reconnected")
    assert await lab.post(b"after") == b"after"
    assert client.connections >= 2


def test_the_back_off_grows_caps_and_is_jittered() -> None:
    waits = [backoff_s(n, 0.999) for n in range(1, 12)]
    assert waits == sorted(waits) and waits[-1] <= 15.0
    assert backoff_s(3, 0.0) == pytest.approx(backoff_s(3, 0.999) / 2, rel=0.01)


def test_a_gateway_without_a_tunnel_server_never_routes_to_a_tunnel_replica() -> None:
    fleet = Fleet(random.Random(1), BalancerConfig())
    fleet.apply(table(9999))  # the node's own address: unreachable from here
    assert fleet.deployments["m"].route.replicas == ()
    assert fleet.table.deployments["m"].replicas  # the portal's table is kept as it came


async def test_requests_in_flight_on_a_dropped_tunnel_are_retried_on_another_replica(
        lab: Lab, client: TunnelClient) -> None:
    other = EchoReplica()
    other.release.set()  # answers /stall at once: only the tunnel node's replica stalls
    other_port = await other.start()
    both = table(lab.replica_port)
    route = both.deployments["m"]
    direct = ReplicaRoute(replica_id=2, host="127.0.0.1", port=other_port, replica_key="rk",
                          version=1, node_id=8)
    lab.fleet.apply(dataclasses.replace(both, deployments={"m": dataclasses.replace(
        route, replicas=(*route.replicas, direct))}))
    metrics = GatewayMetrics(True, lambda: ())
    forwarder = Forwarder(lab.pool, metrics)
    runtime = lab.fleet.deployments["m"]
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    requests = [asyncio.ensure_future(forwarder.forward(
        runtime, 1, UpstreamRequest(b"POST", b"/stall", [], b"body %d" % i), deadline))
        for i in range(16)]
    try:
        await eventually(lambda: lab.replica.stalled > 0, "a request stalled on the tunnel")
        await lab.server.aclose()  # the gateway side of the tunnel goes: streams are reset
        answers = await asyncio.gather(*requests)
    finally:
        other.close()
    assert [a.status for a in answers] == [200] * 16
    assert metrics.retries.labels("m")._value.get() >= 1
    assert lab.replica.requests == 0  # nothing was answered by the stalled replica


async def test_the_tunnel_rides_the_gateway_s_tls(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = self_signed_files(tmp_path / "gateway.crt", tmp_path / "gateway.key", "gateway",
                                  ["127.0.0.1"], ca=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the node's "system CAs" trust it
    replica = EchoReplica()
    replica_port = await replica.start()
    fleet = Fleet(random.Random(1), BalancerConfig())
    fleet.apply(table(replica_port))
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    add_tunnel_arguments(parser)
    urls: list[str] = []
    pool = UpstreamPool()
    server = attach_tunnels(parser.parse_args([
        "--tunnel-port", "0", "--tunnel-tls-cert-file", str(cert),
        "--tunnel-tls-key-file", str(key)]), fleet, pool, urls.append)
    assert server is not None
    await server.start()
    fleet.apply(fleet.table)
    agent = TunnelClient(urls[0], NODE_ID, KEY, {replica_port})
    task = asyncio.ensure_future(agent.run())
    try:
        assert urls[0].startswith("wss://127.0.0.1:")
        await eventually(lambda: fleet.deployments["m"].route.replicas, "the tunnel over TLS")
        routed = fleet.deployments["m"].route.replicas[0]
        answer = await pool.request(routed.host, routed.port, b"POST", b"/echo", [], b"tls")
        assert answer.body == b"tls"
        with pytest.raises((InvalidMessage, ConnectionClosed, OSError)):  # no plain ws://
            async with connect(urls[0].replace("wss://", "ws://"), open_timeout=10):
                pass
    finally:
        task.cancel()
        pool.close()
        await server.aclose()
        replica.close()
