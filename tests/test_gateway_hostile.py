"""Hostile input at the gateway: nothing unauthenticated grows its state, odd numbers are 4xx.

In-process ASGI against the shared real replicas; raw ASGI calls where a real HTTP server
would not let the odd header through (the app must not rely on that).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from serving.gateway.app import GatewayApp
from serving.gateway.auth import SessionCache
from serving.gateway.limits import MAX_CREDENTIAL_BYTES, MAX_HEADERS_TOTAL_BYTES
from tests.gateway_helpers import (
    BEARER,
    MLP,
    Fleet,
    GatewayThread,
    MemoryTableSource,
    api_key,
    deployment,
    features,
    mlp_request,
    replica_route,
    shared_fleet,
    table,
)

pytestmark = pytest.mark.slow
INFER = f"/v2/models/{MLP}/infer"
LIMITED = "swk_limited"  # a key with a rate limit: it has a bucket


@pytest.fixture(scope="module")
def fleet(request, tmp_path_factory) -> Fleet:
    return shared_fleet(request, tmp_path_factory)


class GoodSessions:
    """A SessionAuth where only the session "good" is logged in."""

    async def allows(self, session_key: str, deployment: str) -> bool:
        return session_key == "good"


@pytest.fixture
async def gateway(fleet) -> AsyncIterator[GatewayApp]:
    route = deployment(MLP, [replica_route(fleet.mlp_v1[0], 1)])
    keys = [api_key(LIMITED, 2, rate_limit_rps=1000.0, burst=1000)]
    app = GatewayApp(MemoryTableSource(table(route, keys=keys)), GoodSessions())
    yield app
    await app.aclose()


@pytest.fixture
async def http(gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway),
                                 base_url="http://gateway", timeout=30) as client:
        yield client


def series(metrics_text: str) -> set[str]:
    """Return the metric series (name and labels) in a Prometheus exposition."""
    return {line.rpartition(" ")[0] for line in metrics_text.splitlines()
            if line and not line.startswith("#")}


def bogus_requests(n: int) -> list[tuple[str, dict[str, str]]]:
    """Return n anonymous requests, each with credentials or names never seen before."""
    shapes: list[Callable[[int], tuple[str, dict[str, str]]]] = [
        lambda i: (INFER, {"Authorization": f"Bearer made-up-{i}"}),
        lambda i: (INFER, {"Authorization": f"Bearer {'k' * 4000}{i}"}),  # over the guard
        lambda i: (f"/v2/models/made-up-{i}/infer", {"Authorization": f"Bearer nope-{i}"}),
        lambda i: (f"/v2/models/made-up-{i}/infer", dict(BEARER)),  # a real key: 404
        lambda i: (f"/v2/models/{MLP}/versions/{i + 100}/infer", dict(BEARER)),
        lambda i: (f"/v2/models/made-up-{i}/ready", {"Cookie": f"sessionid=nope-{i}"}),
        lambda i: (f"/v2/models/{MLP}/versions/0{i}/ready", {"Cookie": "sessionid=good"}),
        lambda i: (INFER, {"Cookie": f"sessionid={'s' * 4000}{i}"}),  # over the guard
    ]
    return [shapes[i % len(shapes)](i) for i in range(n)]


async def send_all(http: httpx.AsyncClient, requests: list[tuple[str, dict[str, str]]]
                   ) -> set[int]:
    statuses = set()
    for path, headers in requests:
        method = "POST" if path.endswith("/infer") else "GET"
        response = await http.request(method, path, headers=headers, json={})
        assert response.headers["content-type"] == "application/json", path
        statuses.add(response.status_code)
    return statuses


async def test_distinct_bogus_credentials_and_names_leave_every_cache_and_label_as_before(
        gateway, http):
    body = mlp_request(features(1))
    assert (await http.post(INFER, json=body, headers=BEARER)).status_code == 200
    limited = {"Authorization": f"Bearer {LIMITED}"}
    assert (await http.post(INFER, json=body, headers=limited)).status_code == 200
    assert (await http.post(INFER, json=body, headers={"Cookie": "sessionid=good"})
            ).status_code == 200
    await send_all(http, bogus_requests(16))  # every kind of refusal counted once
    sizes = gateway.state_sizes()
    labels = series((await http.get("/metrics")).text)

    statuses = await send_all(http, bogus_requests(800)[16:])

    assert statuses == {401, 404}
    after = gateway.state_sizes()
    # Refusals of made-up sessions may be remembered, but only up to a bound of their own.
    assert after.pop("sessions_denied") <= 1_000
    sizes.pop("sessions_denied")
    assert after == sizes
    assert series((await http.get("/metrics")).text) == labels


async def test_a_flood_of_made_up_sessions_never_evicts_an_allowed_one():
    asked: list[str] = []

    class Counting:
        async def allows(self, session_key: str, deployment: str) -> bool:
            asked.append(session_key)
            return session_key == "good"

    cache = SessionCache(Counting(), lambda: 0.0, max_entries=10, max_denied_entries=5)
    assert await cache.allows("good", "m")
    for i in range(50):
        assert not await cache.allows(f"bogus-{i}", "m")
    assert await cache.allows("good", "m")
    assert asked.count("good") == 1
    assert cache.sizes()["sessions_denied"] <= 5


async def test_over_long_headers_and_paths_are_refused_with_json(http):
    huge_bearer = {"Authorization": "Bearer " + "x" * 60_000}
    response = await http.post(INFER, json={}, headers=huge_bearer)
    assert response.status_code == 431
    assert "the largest: 'authorization'" in response.json()["error"]
    many = {f"x-pad-{i}": "p" * (MAX_HEADERS_TOTAL_BYTES // 4) for i in range(5)}
    for path in ("/v2/health/live", f"/v2/models/{MLP}/ready"):
        response = await http.get(path, headers={**many, **BEARER})
        assert response.status_code == 431
        assert f"longer than {MAX_HEADERS_TOTAL_BYTES} bytes in all" in response.json()["error"]
    response = await http.get(f"/v2/models/{'m' * 3000}/ready", headers=BEARER)
    assert response.status_code == 414
    assert "longer than" in response.json()["error"]


async def test_credentials_longer_than_any_real_one_are_refused_before_any_lookup(http):
    long_key = {"Authorization": "Bearer " + "k" * MAX_CREDENTIAL_BYTES}
    response = await http.post(INFER, json={}, headers=long_key)
    assert response.status_code == 401
    assert f"longer than {MAX_CREDENTIAL_BYTES} bytes" in response.json()["error"]
    long_session = {"Cookie": "sessionid=" + "s" * (MAX_CREDENTIAL_BYTES + 1)}
    response = await http.post(INFER, json={}, headers=long_session)
    assert response.status_code == 401
    assert "session cookie" in response.json()["error"]


async def test_hundreds_of_large_distinct_bearers_retain_no_memory(gateway, http, caplog):
    # pytest keeps every captured log record: httpx's line per request would count here.
    caplog.set_level(logging.WARNING, logger="httpx")
    assert (await http.get(f"/v2/models/{MLP}/ready", headers=BEARER)).status_code == 200
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(400):
            size = (7_000, 60_000)[i % 2]  # under and over the header limit
            headers = {"Authorization": f"Bearer {i}{'x' * size}"}
            status = (await http.post(INFER, json={}, headers=headers)).status_code
            assert status in (401, 431)
        gc.collect()
        retained_bytes = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # Before the guards: every bearer stayed cached (over 13 MB here).
    assert retained_bytes < 1_000_000, retained_bytes


async def test_a_unicode_digit_or_a_huge_version_is_a_4xx_not_a_500(http):
    for version in ("%C2%B2", "%D9%A3", "9" * 1000, "1_0", "+1", " 1", "01", "-1"):
        path = f"/v2/models/{MLP}/versions/{version}/infer"
        anonymous = await http.post(path, json={})
        assert anonymous.status_code == 401, version
        keyed = await http.post(path, json={}, headers=BEARER)
        assert keyed.status_code == 404, version
        assert "unknown version" in keyed.json()["error"]


async def raw_call(app: GatewayApp, path: str, headers: list[tuple[bytes, bytes]],
                   body: bytes = b"") -> tuple[int, dict[str, Any]]:
    """Call the ASGI app with headers a real HTTP parser would not pass on."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
             "query_string": b"", "headers": headers}
    await asyncio.wait_for(app(scope, receive, send), 30)
    return sent[0]["status"], json.loads(sent[1]["body"])


@pytest.mark.parametrize(("length", "status"), [
    (b"\xc2\xb2", 400), ("²".encode(), 400), (b"9" * 5000, 413), (b"-1", 400), (b" 5", 400),
    (b"99999999999999999999", 413),
])
async def test_an_odd_content_length_is_a_4xx(gateway, length, status):
    auth = (b"authorization", f"Bearer {BEARER['Authorization'].split()[1]}".encode())
    got, body = await raw_call(gateway, INFER, [auth, (b"content-length", length)], b"{}")
    assert got == status
    assert "error" in body


def test_a_real_server_answers_431_json_for_a_60_kb_bearer(fleet):
    app = GatewayApp(MemoryTableSource(table(deployment(MLP, [replica_route(fleet.mlp_v1[0],
                                                                             1)]))))
    with GatewayThread(app) as served, httpx.Client(base_url=served.url) as client:
        response = client.post(INFER, json={}, headers={"Authorization": "x" * 60_000})
        assert response.status_code == 431
        assert response.json()["error"]
