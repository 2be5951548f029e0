"""The gateway's keep-alive pool against a small scripted HTTP/1.1 server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from serving.gateway.upstream import (
    ConnectFailed,
    ConnectionBroken,
    UpstreamPool,
    UpstreamTimeout,
)
from tests.gateway_helpers import eventually
from tests.replica_models import free_port

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"


class ScriptedServer:
    """Echoes request bodies; `script` says what to do with the n-th request of a connection:
    "ok", "close" (answer with Connection: close), "drop" (close without answering),
    "half" (send half a response, then close), "hang" (never answer)."""

    def __init__(self) -> None:
        self.script: dict[int, str] = {}
        self.accepted = 0
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            for n in range(1, 1000):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                action = self.script.get(n, "ok")
                if action in ("drop", "hang"):
                    if action == "hang":
                        await asyncio.sleep(3600)
                    break
                answer = OK % (len(body), body)
                if action == "close":
                    answer = answer.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
                writer.write(answer[: len(answer) // 2] if action == "half" else answer)
                await writer.drain()
                if action in ("close", "half"):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    scripted = ScriptedServer()
    await scripted.start()
    yield scripted
    await scripted.stop()


async def post(pool: UpstreamPool, server: ScriptedServer, body: bytes = b"hello",
               deadline: float | None = None):
    return await pool.request("127.0.0.1", server.port, b"POST", b"/v2/models/m/infer?x=1",
                              [(b"authorization", b"Bearer k")], body, deadline)


async def test_sequential_requests_share_one_connection(server):
    pool = UpstreamPool()
    for i in range(5):
        response = await post(pool, server, b"body-%d" % i)
        assert (response.status, response.body) == (200, b"body-%d" % i)
        assert (b"content-type", b"text/plain") in response.headers
    assert (server.accepted, pool.connections_opened) == (1, 1)
    first = server.requests[0]
    assert first.startswith(b"POST /v2/models/m/infer?x=1 HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:%d\r\n" % server.port in first
    assert b"\r\nauthorization: Bearer k\r\n" in first
    pool.close()


async def test_concurrent_requests_open_connections_that_all_go_back_idle(server):
    pool = UpstreamPool(max_idle_per_host=3)
    bodies = await asyncio.gather(*[post(pool, server, b"%d" % i) for i in range(5)])
    assert sorted(r.body for r in bodies) == [b"0", b"1", b"2", b"3", b"4"]
    assert pool.connections_opened == 5
    assert pool.idle_count("127.0.0.1", server.port) == 3  # the bound holds
    pool.close()


async def test_a_reused_connection_closed_by_the_server_is_retried_once_on_a_fresh_one(server):
    server.script = {2: "drop"}  # the keep-alive race: closed as our request arrived
    pool = UpstreamPool()
    assert (await post(pool, server, b"a")).body == b"a"
    assert (await post(pool, server, b"b")).body == b"b"
    assert (server.accepted, pool.connections_opened) == (2, 2)
    pool.close()


async def test_a_response_cut_short_is_an_error_and_not_retried(server):
    server.script = {2: "half"}
    pool = UpstreamPool()
    await post(pool, server)
    with pytest.raises(ConnectionBroken) as raised:
        await post(pool, server)
    assert raised.value.response_started
    assert pool.connections_opened == 1
    pool.close()


async def test_a_fresh_connection_dropped_without_an_answer_is_an_error(server):
    server.script = {1: "drop"}
    pool = UpstreamPool()
    with pytest.raises(ConnectionBroken):
        await post(pool, server)
    assert pool.connections_opened == 1  # no retry: nothing was reused
    pool.close()


async def test_connection_close_answers_are_not_reused(server):
    server.script = {1: "close"}
    pool = UpstreamPool()
    assert (await post(pool, server)).status == 200
    assert (await post(pool, server)).status == 200
    assert server.accepted == 2
    pool.close()


async def test_nothing_listening_is_a_connect_failure():
    pool = UpstreamPool()
    with pytest.raises(ConnectFailed):
        await pool.request("127.0.0.1", free_port(), b"POST", b"/", [], b"")


async def test_a_deadline_ends_the_wait_and_the_connection(server):
    server.script = {2: "hang"}
    pool = UpstreamPool()
    await post(pool, server)
    loop = asyncio.get_running_loop()
    with pytest.raises(UpstreamTimeout):
        await post(pool, server, deadline=loop.time() + 0.05)
    assert pool.idle_count("127.0.0.1", server.port) == 0
    assert (await post(pool, server, b"again")).body == b"again"
    assert server.accepted == 2
    pool.close()


async def test_a_cancelled_request_closes_its_connection(server):
    server.script = {1: "hang"}
    pool = UpstreamPool()
    request = asyncio.ensure_future(post(pool, server))
    await eventually(lambda: server.requests, "the request to reach the replica")
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert pool.idle_count("127.0.0.1", server.port) == 0


async def test_idle_connections_expire_before_the_replica_would_close_them(server):
    now_s = [0.0]
    pool = UpstreamPool(idle_timeout_s=30.0, clock=lambda: now_s[0])
    await post(pool, server)
    now_s[0] = 29.0
    await post(pool, server)
    assert server.accepted == 1
    now_s[0] = 60.0
    await post(pool, server)
    assert server.accepted == 2
    pool.close()
