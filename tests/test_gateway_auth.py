"""Who gets through the gateway, and what it answers itself (in-process ASGI, real replicas)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import numpy as np
import pytest

from serving.gateway.app import GatewayApp
from tests.gateway_helpers import (
    BEARER,
    MLP,
    Fleet,
    MemoryTableSource,
    api_key,
    deployment,
    eventually,
    expected_scores,
    features,
    metric_value,
    mlp_request,
    replica_route,
    shared_fleet,
    table,
)

pytestmark = pytest.mark.slow
INFER = f"/v2/models/{MLP}/infer"
NOW_S = 1_800_000_000.0  # the wall clock the tests pretend it is


@pytest.fixture(scope="module")
def fleet(request, tmp_path_factory) -> Fleet:
    return shared_fleet(request, tmp_path_factory)


class Gateway:
    """An app, its table source and an ASGI client, built per test."""

    def __init__(self, app: GatewayApp, source: MemoryTableSource) -> None:
        self.app = app
        self.source = source
        self.clock_s = 0.0
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                      base_url="http://gateway", timeout=30)


@pytest.fixture
async def make_gateway(fleet) -> AsyncIterator[Callable[..., Gateway]]:
    built: list[Gateway] = []

    def make(*keys: Any, session_auth: Any = None, **options: Any) -> Gateway:
        route = deployment(MLP, [replica_route(fleet.mlp_v1[0], 1)])
        source = MemoryTableSource(table(route, deployment("empty", []), keys=keys))
        holder: list[Gateway] = []
        app = GatewayApp(source, session_auth, clock=lambda: holder[0].clock_s,
                         wall_clock=lambda: NOW_S, **options)
        holder.append(Gateway(app, source))
        built.append(holder[0])
        return holder[0]

    yield make
    for gateway in built:
        await gateway.http.aclose()
        await gateway.app.aclose()


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def test_health_and_server_metadata_need_no_key(make_gateway):
    http = make_gateway().http
    for path in ("/v2", "/v2/"):
        response = await http.get(path)
        assert response.status_code == 200, path
        assert response.json()["name"] == "swarm-portal"
        assert "binary_tensor_data" in response.json()["extensions"]
    assert (await http.get("/v2/health/live")).json() == {"live": True}
    assert (await http.get("/v2/health/ready")).json() == {"ready": True}


@pytest.mark.parametrize(("method", "path"), [
    ("GET", f"/v2/models/{MLP}"), ("GET", f"/v2/models/{MLP}/ready"),
    ("POST", INFER), ("POST", f"/v2/models/{MLP}/versions/1/infer")])
async def test_model_endpoints_refuse_a_missing_key(make_gateway, method, path):
    response = await make_gateway().http.request(method, path, json=mlp_request(features(1)))
    assert response.status_code == 401
    assert "API key" in response.json()["error"]
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("headers", "message"), [
    (bearer("not-a-key"), "unknown API key"),
    (bearer("expired"), "expired"),
    ({"Authorization": "Token abc"}, "Bearer <API key>"),
])
async def test_unknown_expired_and_malformed_keys_get_401(make_gateway, headers, message):
    gateway = make_gateway(api_key("expired", 2, expires_at_s=NOW_S - 1))
    response = await gateway.http.post(INFER, json=mlp_request(features(1)), headers=headers)
    assert response.status_code == 401
    assert message in response.json()["error"]


async def test_a_key_scoped_to_other_deployments_gets_403(make_gateway):
    gateway = make_gateway(api_key("scoped", 2, ["empty"]))
    response = await gateway.http.post(INFER, json=mlp_request(features(1)),
                                       headers=bearer("scoped"))
    assert response.status_code == 403
    assert MLP in response.json()["error"]


async def test_a_valid_key_reaches_the_replica(make_gateway):
    gateway = make_gateway(api_key("scoped", 2, [MLP], expires_at_s=NOW_S + 60))
    rows = features(3, seed=4)
    response = await gateway.http.post(INFER, json=mlp_request(rows), headers=bearer("scoped"))
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    np.testing.assert_allclose(np.array(output["data"]).reshape(output["shape"]),
                               expected_scores(rows), rtol=1e-5, atol=1e-6)
    assert gateway.app.in_flight() == {MLP: 0, "empty": 0}


async def test_the_rate_limit_answers_429_with_retry_after(make_gateway):
    gateway = make_gateway(api_key("limited", 2, rate_limit_rps=0.5, burst=2))
    body, headers = mlp_request(features(1)), bearer("limited")
    statuses = [(await gateway.http.post(INFER, json=body, headers=headers)).status_code
                for _ in range(2)]
    refused = await gateway.http.post(INFER, json=body, headers=headers)
    assert statuses == [200, 200]
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "2"  # one token every 2 s at 0.5/s
    assert "rate limit" in refused.json()["error"]
    assert (await gateway.http.post(INFER, json=body)).status_code == 401  # before the bucket
    gateway.clock_s += 2.0
    assert (await gateway.http.post(INFER, json=body, headers=headers)).status_code == 200


async def test_bodies_over_the_limit_get_413_declared_or_streamed(make_gateway):
    gateway = make_gateway(max_body_bytes=1000)
    declared = await gateway.http.post(INFER, content=b"x" * 1001, headers=BEARER)
    assert declared.status_code == 413
    assert "1000 bytes" in declared.json()["error"]

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"y" * 300

    streamed = await gateway.http.post(INFER, content=chunks(), headers=BEARER)
    assert streamed.status_code == 413
    assert (await gateway.http.post(INFER, json=mlp_request(features(2)),
                                    headers=BEARER)).status_code == 200


@pytest.mark.parametrize(("method", "path", "status", "message"), [
    ("POST", "/v2/models/nope/infer", 404, "unknown model 'nope'"),
    ("GET", "/v2/models/nope", 404, "unknown model"),
    ("POST", f"/v2/models/{MLP}/versions/7/infer", 404, "unknown version '7'"),
    ("GET", f"/v2/models/{MLP}/versions/latest/ready", 404, "unknown version 'latest'"),
    ("GET", f"/v2/models/{MLP}/stats", 404, "no such endpoint"),
    ("GET", "/v2/repository/index", 404, "no such endpoint"),
    ("GET", INFER, 405, "use POST"),
    ("POST", "/v2", 405, "use GET"),
])
async def test_the_gateway_answers_json_errors_itself(make_gateway, method, path, status,
                                                      message):
    response = await make_gateway().http.request(method, path, headers=BEARER)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]


async def test_malformed_json_gets_the_replicas_400(make_gateway):
    response = await make_gateway().http.post(INFER, content=b"{not json", headers=BEARER)
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]


async def test_no_replica_gets_503_with_retry_after(make_gateway):
    http = make_gateway().http
    response = await http.post("/v2/models/empty/infer", json={}, headers=BEARER)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    ready = await http.get("/v2/models/empty/ready", headers=BEARER)
    assert (ready.status_code, ready.json()["ready"]) == (503, False)
    assert (await http.get(f"/v2/models/{MLP}/ready", headers=BEARER)).status_code == 200


class Sessions:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def allows(self, session_key: str, deployment: str) -> bool:
        self.calls.append((session_key, deployment))
        return session_key == "good"


async def test_a_portal_session_may_call_without_a_key_and_is_asked_once(make_gateway):
    sessions = Sessions()
    http = make_gateway(session_auth=sessions).http
    body = mlp_request(features(1))
    for _ in range(3):
        response = await http.post(INFER, json=body,
                                   headers={"Cookie": "csrftoken=x; sessionid=good"})
        assert response.status_code == 200, response.text
    refused = await http.post(INFER, json=body, headers={"Cookie": "sessionid=stale"})
    assert refused.status_code == 401
    assert sessions.calls == [("good", MLP), ("stale", MLP)]


async def test_a_revoked_key_stops_working_within_a_second(make_gateway, fleet):
    gateway = make_gateway(api_key("doomed", 2))
    body, headers = mlp_request(features(1)), bearer("doomed")
    assert (await gateway.http.post(INFER, json=body, headers=headers)).status_code == 200
    gateway.source.set(table(deployment(MLP, [replica_route(fleet.mlp_v1[0], 1)])))

    async def refused() -> bool:
        return (await gateway.http.post(INFER, json=body, headers=headers)).status_code == 401

    await eventually(refused, "the revoked key to be refused", deadline_s=1.0)


async def test_metrics_count_requests_and_rejections_behind_a_token(make_gateway):
    gateway = make_gateway(api_key("scoped", 2, ["empty"]), metrics_token="scrape-me")
    http = gateway.http
    for _ in range(3):
        assert (await http.post(INFER, json=mlp_request(features(1)), headers=BEARER)
                ).status_code == 200
    await http.post(INFER, json={})
    await http.post(INFER, json={}, headers=bearer("scoped"))
    assert (await http.get("/metrics")).status_code == 401
    scraped = await http.get("/metrics", headers=bearer("scrape-me"))
    assert scraped.status_code == 200
    text = scraped.text
    labels = {"model": MLP, "version": "1"}
    assert metric_value(text, "nv_inference_request_success_total", **labels) == 3
    assert metric_value(text, "nv_inference_count_total", **labels) == 3
    assert metric_value(text, "nv_inference_request_duration_seconds_count", **labels) == 3
    assert metric_value(text, "swarm_gateway_rejections_total", model=MLP, code="401") == 1
    assert metric_value(text, "swarm_gateway_rejections_total", model=MLP, code="403") == 1
    assert metric_value(text, "swarm_gateway_in_flight", model=MLP) == 0
    assert 'swarm_gateway_replica_in_flight{model="tabular",replica="1",version="1"}' in text


async def test_metrics_can_be_turned_off(make_gateway):
    response = await make_gateway(metrics_enabled=False).http.get("/metrics")
    assert response.status_code == 404


async def test_a_key_created_a_moment_ago_works_before_the_next_poll(make_gateway):
    gateway = make_gateway(poll_interval_s=3600.0)  # the regular poll never comes in time
    assert (await gateway.http.get("/v2/health/ready")).status_code == 200  # table loaded
    route = deployment(MLP, gateway.app.table.deployments[MLP].replicas)
    gateway.source.set(table(route, keys=[api_key("brand-new", 7)]))
    response = await gateway.http.get(f"/v2/models/{MLP}", headers=bearer("brand-new"))
    assert response.status_code == 200, response.text
    refused = await gateway.http.get(f"/v2/models/{MLP}", headers=bearer("never-made"))
    assert refused.status_code == 401 and "unknown API key" in refused.json()["error"]
