"""The gateway's parts on their own: paths, tables, the wait queue, refresh, sessions."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import subprocess
import sys

import httpx
import pytest

from serving.balancing import Balancer
from serving.gateway.app import GatewayApp
from serving.gateway.auth import Authenticator, Rejected, SessionCache, session_key
from serving.gateway.deployments import DeploymentRuntime, Fleet, WaitQueue
from serving.gateway.filesource import FileTableSource, write_table
from serving.gateway.portal_source import PortalClient
from serving.gateway.refresh import TableRefresher
from serving.gateway.requests import (
    UNKNOWN_VERSION,
    DisconnectWatcher,
    ModelPath,
    parse_model_path,
)
from serving.gateway.routes import ReplicaRoute, RouteTable, VersionInfo
from tests.gateway_helpers import (
    BEARER,
    MemoryTableSource,
    api_key,
    deployment,
    eventually,
    table,
)
from tests.replica_models import REPO_ROOT, free_port


def replica(replica_id: int, version: int = 1, draining: bool = False) -> ReplicaRoute:
    return ReplicaRoute(replica_id, "127.0.0.1", 9000 + replica_id, "k", version, draining)


@pytest.mark.parametrize(("path", "parsed"), [
    ("/v2/models/m", ModelPath("m", None, "", "")),
    ("/v2/models/m/ready", ModelPath("m", None, "", "ready")),
    ("/v2/models/m/infer", ModelPath("m", None, "", "infer")),
    ("/v2/models/m/versions/3", ModelPath("m", 3, "3", "")),
    ("/v2/models/m/versions/3/infer", ModelPath("m", 3, "3", "infer")),
    ("/v2/models/m/versions/x/ready", ModelPath("m", UNKNOWN_VERSION, "x", "ready")),
    ("/v2/models/m/stats", None),
    ("/v2/models/m/infer/more", None),
    ("/v2/models/", None),
    ("/v2/models/m/versions", None),
])
def test_model_paths_split_into_name_version_and_action(path, parsed):
    assert parse_model_path(path) == parsed


def test_metadata_describes_the_heaviest_version_unless_one_is_named():
    v1 = VersionInfo("pytorch_torchscript", [{"name": "a"}], [{"name": "b"}])
    v2 = VersionInfo("pytorch_torch_export", [{"name": "c"}], [{"name": "d"}])
    route = deployment("m", [replica(1, 1), replica(2, 2)], {1: 0.8, 2: 0.2})
    runtime = DeploymentRuntime(dataclasses.replace(route, versions={1: v1, 2: v2}),
                                Balancer(random.Random(0)))
    unpinned, pinned = json.loads(runtime.metadata(None)), json.loads(runtime.metadata(2))
    assert unpinned == {"name": "m", "versions": ["1", "2"], "platform": "pytorch_torchscript",
                        "inputs": [{"name": "a"}], "outputs": [{"name": "b"}]}
    assert pinned["platform"] == "pytorch_torch_export"
    assert pinned["inputs"] == [{"name": "c"}]


def test_readiness_needs_a_non_draining_replica_of_a_weighted_or_named_version():
    route = deployment("m", [replica(1, 1, draining=True), replica(2, 2)], {1: 1.0, 2: 0.0})
    runtime = DeploymentRuntime(route, Balancer(random.Random(0)))
    assert not runtime.is_ready(None)  # v2 has replicas but no unpinned traffic
    assert runtime.is_ready(2)
    assert not runtime.is_ready(1)
    assert runtime.routing_weights == {1: 1.0, 2: 0.0}  # v2 can still be pinned


def test_a_new_table_keeps_balancer_state_and_removing_a_deployment_empties_it():
    fleet = Fleet(random.Random(0), Balancer(random.Random(0)).config)
    fleet.apply(table(deployment("m", [replica(1), replica(2)])))
    runtime = fleet.deployments["m"]
    lease = runtime.choose(0.0, frozenset(), 1)
    fleet.apply(table(deployment("m", [replica(1), replica(2), replica(3)]), revision="2"))
    assert fleet.deployments["m"] is runtime
    assert fleet.in_flight() == {"m": 1}
    fleet.apply(table(revision="3"))
    assert "m" not in fleet.deployments
    assert runtime.route.replicas == ()
    runtime.release(lease, "success", 0.01, 1.0)
    assert fleet.in_flight() == {"m": 0}


async def test_the_wait_queue_is_bounded_and_wakes_one_waiter_per_release():
    queue = WaitQueue()
    first = asyncio.ensure_future(queue.wait(1, limit=2, timeout_s=5))
    second = asyncio.ensure_future(queue.wait(None, limit=2, timeout_s=5))
    await asyncio.sleep(0)
    assert queue.depth == 2
    assert await queue.wait(1, limit=2, timeout_s=5) is False  # full: refused at once
    queue.wake(1)  # wakes the first for version 1 and the first waiting for any version
    assert await first and await second
    assert queue.depth == 0


async def test_a_waiter_times_out_and_leaves_the_queue():
    queue = WaitQueue()
    assert await queue.wait(1, limit=5, timeout_s=0.01) is False
    assert queue.depth == 0


async def test_a_waiter_that_leaves_after_being_woken_passes_the_turn_on():
    queue = WaitQueue()
    leaving = asyncio.ensure_future(queue.wait(1, limit=5, timeout_s=5))
    staying = asyncio.ensure_future(queue.wait(1, limit=5, timeout_s=5))
    await asyncio.sleep(0)
    queue.wake(1)
    leaving.cancel()  # woken, but its client went away before it ran
    assert await staying is True


class FakeClient:
    """An ASGI receive() that counts its callers and disconnects when told to."""

    def __init__(self) -> None:
        self.calls = 0
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, str]:
        self.calls += 1
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def watched_request(watcher: DisconnectWatcher, client: FakeClient,
                          run_s: float) -> bool:
    """Run a request for `run_s` under the watcher; return whether its client went away."""
    watch = watcher.watch(asyncio.get_running_loop(), client.receive)
    try:
        await asyncio.sleep(run_s)
    except asyncio.CancelledError:
        assert watch.client_gone
        return True
    finally:
        watcher.stop(watch)
    return False


# Real timers at 0.2 s, with checks 80-100 ms away from any due time: a loop lagging that
# much would be needed to see a watcher start early or late.
AFTER_S = 0.2


async def test_a_short_request_is_never_watched():
    watcher, client = DisconnectWatcher(AFTER_S), FakeClient()
    assert await watched_request(watcher, client, 0.001) is False
    await asyncio.sleep(AFTER_S + 0.1)  # past the shared timer: nothing left to start
    assert client.calls == 0


async def test_long_requests_are_watched_from_after_s_each_and_cancelled_on_disconnect():
    watcher = DisconnectWatcher(AFTER_S)
    first_client, second_client, third_client = FakeClient(), FakeClient(), FakeClient()
    first = asyncio.ensure_future(watched_request(watcher, first_client, 5))
    await asyncio.sleep(0.1)
    second = asyncio.ensure_future(watched_request(watcher, second_client, 5))
    third = asyncio.ensure_future(watched_request(watcher, third_client, 0.5))
    await asyncio.sleep(0.12)  # the first is 220 ms old, the others 120 ms
    assert (first_client.calls, second_client.calls) == (1, 0)
    await asyncio.sleep(0.1)  # 320 and 220 ms: the timer re-armed for the second and third
    assert (second_client.calls, third_client.calls) == (1, 1)
    first_client.gone.set()
    assert await first is True
    assert await third is False  # it finished first: stop() ended its watcher
    assert not second.done()
    second_client.gone.set()
    assert await second is True


async def test_the_refresher_reloads_on_a_new_revision_and_in_full_now_and_then():
    now_s = [0.0]
    source = MemoryTableSource(table(revision="a"))
    applied: list[RouteTable] = []
    refresher = TableRefresher(source, applied.append, lambda: now_s[0], full_reload_s=5.0)
    await refresher.load()
    assert not await refresher.step()
    source.set(table(revision="b"))
    assert await refresher.step()
    assert [t.revision for t in applied] == ["a", "b"]
    now_s[0] = 5.0
    assert await refresher.step()  # the safety net: unchanged, reloaded anyway
    assert source.loads == 3


class FrozenSource(MemoryTableSource):
    """A source whose revision call never answers (a frozen portal)."""

    async def revision(self) -> str:
        await asyncio.Event().wait()
        return ""


async def test_an_early_poll_is_shared_and_waited_for_at_most_wait_s():
    now_s = [0.0]
    frozen = TableRefresher(FrozenSource(table()), lambda _table: None, lambda: now_s[0])
    loop = asyncio.get_running_loop()
    started_s = loop.time()
    await asyncio.gather(*[frozen.refresh_soon(wait_s=0.2) for _ in range(5)])
    assert 0.2 <= loop.time() - started_s < 2  # the callers gave up waiting together
    assert frozen._forced is not None and not frozen._forced.done()  # the poll goes on
    frozen._forced.cancel()
    source = MemoryTableSource(table(revision="a"))
    refresher = TableRefresher(source, lambda _table: None, lambda: now_s[0])
    await refresher.refresh_soon()
    await refresher.refresh_soon()  # within min_interval_s of the last: no second poll
    assert source.loads == 1


async def test_a_file_source_sees_a_replaced_file(tmp_path):
    path = tmp_path / "table.json"
    write_table(path, table(revision="1"))
    source = FileTableSource(path)
    before = await source.revision()
    assert (await source.load()).revision == "1"
    write_table(path, table(deployment("m", [replica(1)]), revision="2"))
    assert await source.revision() != before
    assert set((await source.load()).deployments) == {"m"}


class CountingSessions:
    def __init__(self, allowed: set[tuple[str, str]]) -> None:
        self.allowed = allowed
        self.calls = 0

    async def allows(self, session_key: str, deployment: str) -> bool:
        self.calls += 1
        await asyncio.sleep(0.01)
        return (session_key, deployment) in self.allowed


async def test_session_answers_are_cached_for_a_while_and_asked_once_per_burst():
    now_s = [0.0]
    sessions = CountingSessions({("s1", "m")})
    cache = SessionCache(sessions, lambda: now_s[0], allowed_ttl_s=5, denied_ttl_s=2)
    assert await asyncio.gather(*[cache.allows("s1", "m") for _ in range(10)]) == [True] * 10
    assert sessions.calls == 1
    assert await cache.allows("s1", "other") is False
    now_s[0] = 3.0
    assert await cache.allows("s1", "m") is True  # still cached
    assert await cache.allows("s1", "other") is False  # asked again: denials age faster
    assert sessions.calls == 3
    now_s[0] = 6.0
    await cache.allows("s1", "m")
    assert sessions.calls == 4


def test_the_session_cookie_is_found_among_others():
    assert session_key(b"csrftoken=abc; sessionid=xyz; theme=dark") == "xyz"
    assert session_key(b"csrftoken=abc") is None


async def test_keys_are_checked_for_existence_expiry_and_scope():
    keys = [api_key("live", 1, ["m"]), api_key("old", 2, expires_at_s=100.0)]
    by_digest = {k.digest: k for k in keys}
    auth = Authenticator(None, wall_clock=lambda: 200.0)

    async def status(header: bytes, deployment: str = "m") -> int:
        try:
            await auth.authorize(by_digest, [(b"authorization", header)], deployment)
        except Rejected as rejected:
            return rejected.response.status
        return 200

    assert await status(b"Bearer live") == 200
    assert await status(b"bearer live") == 200
    assert await status(b"Bearer live", "other") == 403
    assert await status(b"Bearer old") == 401
    assert await status(b"Bearer nope") == 401
    assert await status(b"Basic bGl2ZQ==") == 401


def test_the_gateway_imports_neither_django_nor_torch():
    code = ("import sys, serving.gateway.standalone; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'django', 'torch', 'numpy'}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "[]"


class FlakySource(MemoryTableSource):
    """A source that fails until told to recover."""

    def __init__(self, initial: RouteTable) -> None:
        super().__init__(initial)
        self.failing = True

    async def load(self) -> RouteTable:
        if self.failing:
            raise ConnectionError("database is down")
        return await super().load()


def asgi_client(app: GatewayApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw",
                             headers=BEARER)


async def test_without_a_table_the_gateway_says_503_until_the_source_recovers():
    source = FlakySource(table(deployment("m", [replica(1)])))
    app = GatewayApp(source, poll_interval_s=0.02)
    async with asgi_client(app) as http:
        assert (await http.get("/v2/models/m")).status_code == 503
        assert (await http.get("/v2/health/ready")).status_code == 503
        assert (await http.get("/v2/health/live")).status_code == 200
        source.failing = False

        async def metadata_served() -> bool:
            return (await http.get("/v2/models/m")).status_code == 200

        await eventually(metadata_served, "the table to load", deadline_s=5)
    await app.aclose()


async def test_a_bad_route_keeps_the_previous_one_and_errors_are_json():
    source = MemoryTableSource(table(deployment("m", [replica(1)])))
    app = GatewayApp(source, poll_interval_s=0.02)
    async with asgi_client(app) as http:
        assert (await http.get("/v2/models/m")).status_code == 200
        duplicated = dataclasses.replace(deployment("m", [replica(1)]),
                                         replicas=(replica(1), replica(1)))
        source.set(table(duplicated, deployment("other", []), revision="2"))
        await eventually(lambda: "other" in app.table.deployments, "the new table")
        assert app.fleet.deployments["m"].route.replicas == (replica(1),)

        def broken(version: int | None) -> bytes:
            raise RuntimeError("bug")

        app.fleet.deployments["m"].metadata = broken  # type: ignore[method-assign]
        response = await http.get("/v2/models/m")
    await app.aclose()
    assert (response.status_code, response.json()) == (
        500, {"error": "internal error in the gateway"})


# The first table load while the portal starts: one warning line, no traceback.

async def portal_that(behaviour: str, requests: list[int]) -> tuple[str, asyncio.Server | None]:
    """Return (URL, server) of a portal that answers 503, never answers, or is down."""
    if behaviour == "is down":
        return f"http://127.0.0.1:{free_port()}", None

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        requests.append(1)
        if behaviour == "answers 503":
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 8\r\n"
                         b"Connection: close\r\n\r\nstarting")
            await writer.drain()
        else:
            await asyncio.sleep(30)  # until the client times out and the test closes us
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", server


@pytest.mark.parametrize(("behaviour", "reason"), [
    ("answers 503", "the portal answered 503"), ("is down", "ConnectError"),
    ("never answers", "ReadTimeout")])
async def test_a_portal_still_starting_is_one_warning_line_without_a_traceback(
        caplog, tmp_path, behaviour, reason):
    requests: list[int] = []
    url, server = await portal_that(behaviour, requests)
    client = PortalClient(url, "swg_token", timeout_s=0.2)
    app = GatewayApp(client, poll_interval_s=0.02)
    caplog.set_level(logging.DEBUG, logger="serving.gateway")
    try:
        await app.start()
        assert not app.ready
        if server is not None:
            await eventually(lambda: len(requests) >= 4, "the refresh loop to retry")
        else:
            await asyncio.sleep(0.2)  # a closed port gives nothing to wait on: ten polls
    finally:
        await app.aclose()
        await client.aclose()
        if server is not None:
            server.close()
    logged = [r for r in caplog.records if r.name.startswith("serving.gateway")
              and r.levelno >= logging.WARNING]
    assert [r.levelname for r in logged] == ["WARNING"], [r.getMessage() for r in logged]
    message = logged[0].getMessage()
    assert message.startswith("routing table not loaded yet: ") and reason in message
    assert message.endswith("; retrying") and logged[0].exc_info is None


class BrokenSource(MemoryTableSource):
    """A source with a bug: not a transient failure."""

    async def load(self) -> RouteTable:
        raise KeyError("replicas")


async def test_a_bug_in_the_source_keeps_its_traceback(caplog):
    app = GatewayApp(BrokenSource(table(deployment("m", [replica(1)]))), poll_interval_s=5)
    caplog.set_level(logging.WARNING, logger="serving.gateway")
    await app.start()
    await app.aclose()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert errors[0].getMessage() == "routing table not loaded yet; retrying"
