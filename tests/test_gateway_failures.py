"""Failures behind the gateway: killed and dead replicas, 503s, timeouts, queues, hang-ups.

After each test every lease the gateway took must have been released: in-flight is zero.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from serving.balancing import BalancerConfig
from serving.gateway.app import GatewayApp
from tests.gateway_helpers import (
    BEARER,
    MLP,
    SLOW,
    SLOW_INFO,
    Fleet,
    GatewayThread,
    MemoryTableSource,
    completed,
    deployment,
    features,
    launch_replica,
    mlp_artifact,
    mlp_request,
    replica_route,
    shared_fleet,
    slow_request,
    start_replicas,
    table,
    wait_for,
)
from tests.replica_models import MLP_SIGNATURE, ReplicaProcess, free_port, wait_until_ready

pytestmark = pytest.mark.slow
INFER, SLOW_INFER = f"/v2/models/{MLP}/infer", f"/v2/models/{SLOW}/infer"
FAST_EJECTION = BalancerConfig(ejection_base_s=0.5, ejection_max_s=1.0)


@pytest.fixture(scope="module")
def fleet(request, tmp_path_factory) -> Fleet:
    return shared_fleet(request, tmp_path_factory)


@pytest.fixture
def serve() -> Iterator[Callable[..., GatewayThread]]:
    started: list[GatewayThread] = []

    def serve(*deployments: Any, **options: Any) -> GatewayThread:
        app = GatewayApp(MemoryTableSource(table(*deployments)),
                         balancer_config=FAST_EJECTION, **options)
        started.append(GatewayThread(app).__enter__())
        return started[-1]

    yield serve
    for gateway in started:
        wait_for(lambda g=gateway: not any(g.app.in_flight().values()),
                 "every lease to be released", deadline_s=10)
        assert not any(gateway.app.fleet.balancer_in_flight().values())
        assert not any(gateway.app.queue_depth().values())
        gateway.__exit__()


@pytest.fixture
def spare(fleet) -> Iterator[ReplicaProcess]:
    """A replica of tabular v1 of this test's own, free to kill."""
    (replica,) = start_replicas(fleet.directory, [
        (mlp_artifact(fleet.directory), MLP_SIGNATURE, {"name": MLP, "version": 1})])
    yield replica
    replica.stop()


class Load:
    """Client threads sending inference requests until stopped; counts the outcomes."""

    def __init__(self, gateway: GatewayThread, threads: int) -> None:
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(gateway,))
                         for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, gateway: GatewayThread) -> None:
        body = mlp_request(features(1))
        with gateway.client() as client:
            while not self._stop.is_set():
                try:
                    response = client.post(INFER, json=body)
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    continue
                self.statuses.append(response.status_code)
                if response.status_code != 200:
                    self.errors.append(response.text)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def test_killing_a_replica_under_load_fails_no_client_request(fleet, serve, spare):
    gateway = serve(deployment(MLP, [replica_route(fleet.mlp_v1[0], 1),
                                     replica_route(spare, 2)], policy="round_robin"))
    load = Load(gateway, threads=6)
    try:
        wait_for(lambda: completed(spare) >= 20, "the spare to serve requests")
        served_before_kill = len(load.statuses)
        spare.process.send_signal(signal.SIGKILL)
        wait_for(lambda: len(load.statuses) >= served_before_kill + 300,
                 "300 more requests after the kill")
    finally:
        load.stop()
    assert load.errors == []
    assert set(load.statuses) == {200}
    states = {s.replica.replica_id: s for s in gateway.app.fleet.deployments[MLP].balancer.replicas}
    assert states[2].ejections >= 1


def test_an_ejected_replica_is_readmitted_after_its_back_off(fleet, serve):
    port = free_port()  # nothing listens here yet: every attempt is refused
    gateway = serve(deployment(MLP, [replica_route(fleet.mlp_v1[0], 1),
                                     replica_route(port, 2)],
                               policy="round_robin"))
    body = mlp_request(features(1))
    with gateway.client() as client:
        assert all(client.post(INFER, json=body).status_code == 200 for _ in range(10))
        state = gateway.app.fleet.deployments[MLP].balancer.replicas[1]
        assert state.ejections >= 1
        revived = launch_replica(fleet.directory, mlp_artifact(fleet.directory),
                                 MLP_SIGNATURE, port=port, tag="revived", name=MLP, version=1)
        try:
            wait_until_ready(revived)

            def revived_serves() -> bool:
                assert client.post(INFER, json=body).status_code == 200
                return completed(revived) > 0

            wait_for(revived_serves, "the revived replica to get traffic", deadline_s=10)
        finally:
            revived.stop()


def test_a_slow_replica_gets_504_and_its_lease_back(fleet, serve):
    gateway = serve(deployment(SLOW, [replica_route(fleet.slow, 1)], info=SLOW_INFO,
                               request_timeout_s=0.1))
    with gateway.client() as client:
        started_s = time.monotonic()
        response = client.post(SLOW_INFER, json=slow_request())
    assert response.status_code == 504
    assert "0.1 s" in response.json()["error"]
    assert time.monotonic() - started_s < 2.0
    assert gateway.app.in_flight() == {SLOW: 0}


def slow_gateway(fleet: Fleet, serve: Callable[..., GatewayThread],
                 **options: Any) -> GatewayThread:
    return serve(deployment(SLOW, [replica_route(fleet.slow, 1)], info=SLOW_INFO,
                            max_in_flight_per_replica=1, **options))


def test_a_full_queue_answers_503_with_retry_after(fleet, serve):
    gateway = slow_gateway(fleet, serve, queue_limit=1, queue_timeout_s=30)
    app = gateway.app
    results: list[int] = []

    def send() -> None:
        with gateway.client() as client:
            results.append(client.post(SLOW_INFER, json=slow_request()).status_code)

    threads = [threading.Thread(target=send) for _ in range(2)]
    threads[0].start()
    wait_for(lambda: app.in_flight().get(SLOW) == 1, "the first request to be in flight")
    threads[1].start()
    wait_for(lambda: app.queue_depth().get(SLOW) == 1, "the second request to queue")
    with gateway.client() as client:
        refused = client.post(SLOW_INFER, json=slow_request())
    for thread in threads:
        thread.join(timeout=30)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "busy" in refused.json()["error"]
    assert results == [200, 200]


def test_a_queue_wait_that_times_out_answers_503(fleet, serve):
    gateway = slow_gateway(fleet, serve, queue_limit=5, queue_timeout_s=0.05)
    with gateway.client() as client, gateway.client() as second:
        first = threading.Thread(target=client.post, args=(SLOW_INFER,),
                                 kwargs={"json": slow_request()})
        first.start()
        wait_for(lambda: gateway.app.in_flight().get(SLOW) == 1, "the first request")
        refused = second.post(SLOW_INFER, json=slow_request())
        first.join(timeout=30)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"


def raw_request(port: int, path: str, body: bytes) -> socket.socket:
    """Send an HTTP request on a socket of our own and return it, unread."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: gateway\r\nAuthorization: %s\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), BEARER["Authorization"].encode(), len(body), body))
    return sock


def test_clients_that_hang_up_leave_nothing_in_flight_or_queued(fleet, serve):
    gateway = slow_gateway(fleet, serve, queue_limit=5, queue_timeout_s=30)
    app, body = gateway.app, httpx.Request("POST", "/", json=slow_request()).read()
    running = raw_request(gateway.port, SLOW_INFER, body)
    wait_for(lambda: app.in_flight().get(SLOW) == 1, "the first request to be in flight")
    waiting = raw_request(gateway.port, SLOW_INFER, body)
    wait_for(lambda: app.queue_depth().get(SLOW) == 1, "the second request to queue")
    waiting.close()
    wait_for(lambda: app.queue_depth().get(SLOW) == 0, "the queue to empty", deadline_s=2)
    running.close()
    wait_for(lambda: app.in_flight().get(SLOW) == 0, "the lease to be released", deadline_s=2)
    text = app.metrics.render().decode()
    assert f'swarm_gateway_cancelled_total{{model="{SLOW}"}} 2.0' in text


class Always503:
    """A server that answers every request 503, like a draining replica."""

    def __init__(self) -> None:
        self.requests = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = b'{"error":"replica is draining"}'
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                self.requests += 1
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                             b"application/json\r\nRetry-After: 7\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@pytest.fixture
async def draining() -> AsyncIterator[Always503]:
    server = Always503()
    await server.start()
    yield server
    assert server._server is not None
    server._server.close()


async def test_a_503_from_a_replica_is_retried_on_another(fleet, draining):
    routes = [replica_route(draining.port, 1), replica_route(fleet.mlp_v1[0], 2)]
    app = GatewayApp(MemoryTableSource(table(deployment(MLP, routes, policy="round_robin"))))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gateway", headers=BEARER) as http:
        statuses = [(await http.post(INFER, json=mlp_request(features(1)))).status_code
                    for _ in range(4)]
    await app.aclose()
    assert statuses == [200] * 4
    assert draining.requests >= 1
    assert app.in_flight() == {MLP: 0}


async def test_when_every_replica_answers_503_the_client_gets_it(draining):
    app = GatewayApp(MemoryTableSource(table(deployment(MLP, [replica_route(draining.port, 1)]))))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gateway", headers=BEARER) as http:
        response = await http.post(INFER, json={})
    await app.aclose()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"  # the replica's own answer, relayed
    assert response.json() == {"error": "replica is draining"}
    assert app.in_flight() == {MLP: 0}
