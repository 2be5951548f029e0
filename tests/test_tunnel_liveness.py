"""A tunnel whose link goes silent (a cut cable, a NAT that forgets the connection: no
FIN, no RST, just no more packets) is noticed by the WebSocket pings on both ends, and the
node serves again once the link works.

A relay on loopback stands between the agent and the gateway's tunnel port; freezing it
stops every byte in both directions while both of its sockets stay open.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest

from serving.agent.tunnel import TunnelClient
from serving.gateway.forwarding import Forwarder, UpstreamRequest
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.routes import ReplicaRoute
from swarm_protocol.tunnel import CLOSE_TIMEOUT_S, PING_INTERVAL_S, PING_TIMEOUT_S, TUNNEL_PATH
from tests.test_tunnel import (  # noqa: F401 - `lab` is a fixture, used by name
    KEY,
    NODE_ID,
    EchoReplica,
    Lab,
    eventually,
    lab,
    table,
)

pytestmark = pytest.mark.slow

# Both ends send a ping every PING_INTERVAL_S, give up PING_TIMEOUT_S after one without its
# pong and wait CLOSE_TIMEOUT_S for a closing handshake; the margin is for the loop and a
# loaded CI machine (with websockets' 10 s default close timeout it took 14-16 s).
NOTICED_WITHIN_S = PING_INTERVAL_S + PING_TIMEOUT_S + CLOSE_TIMEOUT_S + 4.0
BACK_WITHIN_S = 30.0  # the agent's back-off (at most 5 s) plus its open timeout and more
CHUNK_BYTES = 64 * 1024


class FreezableRelay:
    """A TCP relay on loopback to `target_port`: `freeze()` stops forwarding bytes (and
    end-of-stream) both ways without closing a socket; `thaw()` lets them through again;
    `new_path()` leaves the frozen connections frozen for good (a NAT that forgot them)
    and forwards the ones that come next."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._flowing = asyncio.Event()  # the current path's: each connection keeps its own
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.accepted = 0

    async def start(self) -> int:
        """Listen; return the port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def freeze(self) -> None:
        """Stop forwarding, as a cut link would: nothing is closed, nothing gets through."""
        self._flowing.clear()

    def thaw(self) -> None:
        """Forward again (what was held back goes first, as after a link returns)."""
        self._flowing.set()

    def new_path(self) -> None:
        """Forward new connections; those accepted until now stay frozen."""
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        flowing = self._flowing
        if not flowing.is_set():  # a SYN into a cut link: it never reaches the gateway
            await flowing.wait()
            writer.close()  # the link is back, this try is not: the client tries again
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1",
                                                                 self._target_port)
        except OSError:
            writer.close()
            return
        self._writers.append(up_writer)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pump(source, sink, flowing))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                    flowing: asyncio.Event) -> None:
        try:
            while data := await source.read(CHUNK_BYTES):
                await flowing.wait()
                sink.write(data)
                await sink.drain()
            await flowing.wait()  # an end-of-stream is held back too
        except ConnectionError:
            pass
        finally:
            sink.close()

    async def aclose(self) -> None:
        """Stop listening, close every socket and end every pump."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()


@dataclasses.dataclass
class Relayed:
    gateway: Lab
    relay: FreezableRelay
    agent: TunnelClient
    direct: EchoReplica
    forwarder: Forwarder

    def tunnel_routed(self) -> bool:
        return any(r.node_id == NODE_ID for r in self.gateway.fleet.deployments["m"].route.replicas)

    def back(self) -> bool:
        """Return whether both ends see the tunnel again (the gateway routes to the node a
        moment before the agent has read the handshake's answer)."""
        return self.tunnel_routed() and self.agent.connected.is_set()

    async def forward(self, body: bytes) -> bytes:
        runtime = self.gateway.fleet.deployments["m"]
        deadline = asyncio.get_running_loop().time() + 10.0
        answer = await self.forwarder.forward(
            runtime, 1, UpstreamRequest(b"POST", b"/echo", [], body), deadline)
        assert answer.status == 200
        return bytes(answer.body)  # type: ignore[union-attr]


@pytest.fixture
async def relayed(lab: Lab) -> AsyncIterator[Relayed]:  # noqa: F811 - the imported fixture
    # A second, direct replica (another node, no tunnel) so the deployment keeps serving.
    direct = EchoReplica()
    direct_port = await direct.start()
    with_tunnel = table(lab.replica_port)
    route = with_tunnel.deployments["m"]
    other = ReplicaRoute(replica_id=2, host="127.0.0.1", port=direct_port, replica_key="rk",
                         version=1, node_id=NODE_ID + 1)
    lab.fleet.apply(dataclasses.replace(with_tunnel, deployments={"m": dataclasses.replace(
        route, replicas=(*route.replicas, other))}))
    relay = FreezableRelay(lab.server.port)
    relay_port = await relay.start()
    agent = TunnelClient(f"ws://127.0.0.1:{relay_port}{TUNNEL_PATH}", NODE_ID, KEY,
                         {lab.replica_port}, jitter=lambda: 0.0)
    task = asyncio.ensure_future(agent.run())
    forwarder = Forwarder(lab.pool, GatewayMetrics(True, lambda: ()))
    try:
        yield Relayed(lab, relay, agent, direct, forwarder)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await relay.aclose()
        direct.close()


async def test_a_silent_link_takes_the_node_out_and_it_returns_when_the_link_does(
        relayed: Relayed) -> None:
    gateway, relay, agent = relayed.gateway, relayed.relay, relayed.agent
    loop = asyncio.get_running_loop()
    await eventually(relayed.tunnel_routed, "the tunnel replica routed through the relay")
    assert await gateway.post(b"before") == b"before"  # through the relay and the tunnel
    served_before = gateway.replica.requests

    relay.freeze()
    frozen_at = loop.time()
    await eventually(lambda: not relayed.tunnel_routed(),
                     "the gateway to notice the silent tunnel", NOTICED_WITHIN_S)
    gateway_noticed_s = loop.time() - frozen_at
    assert gateway.server.registry.connected() == set()
    # Requests now go to the direct replica only, none into the silent tunnel.
    bodies = [b"while frozen %d" % i for i in range(8)]
    assert [await relayed.forward(body) for body in bodies] == bodies
    assert gateway.replica.requests == served_before
    assert relayed.direct.requests == len(bodies)
    # The agent notices too (its own pings go unanswered) and starts reconnecting.
    await eventually(lambda: not agent.connected.is_set(),
                     "the agent to notice the silent tunnel", NOTICED_WITHIN_S)
    assert agent.connections == 1

    relay.thaw()
    await eventually(relayed.back, "the tunnel replica back", BACK_WITHIN_S)
    assert agent.connections == 2 and gateway.server.registry.connected() == {NODE_ID}
    assert await gateway.post(b"after") == b"after"
    assert gateway.replica.requests == served_before + 1
    assert gateway_noticed_s <= NOTICED_WITHIN_S


async def test_a_node_whose_old_connection_stays_silent_comes_back_on_a_new_one(
        relayed: Relayed) -> None:
    gateway, agent = relayed.gateway, relayed.agent
    await eventually(relayed.tunnel_routed, "the tunnel replica routed through the relay")
    relayed.relay.freeze()
    await eventually(lambda: not relayed.tunnel_routed(),
                     "the gateway to notice the silent tunnel", NOTICED_WITHIN_S)
    await eventually(lambda: not agent.connected.is_set(),
                     "the agent to notice the silent tunnel", NOTICED_WITHIN_S)
    relayed.relay.new_path()  # the old connections never thaw: only a new one gets through
    await eventually(relayed.back, "the tunnel replica back", BACK_WITHIN_S)
    assert agent.connections == 2 and gateway.server.registry.connected() == {NODE_ID}
    assert await gateway.post(b"new path") == b"new path"
