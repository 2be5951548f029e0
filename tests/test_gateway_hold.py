"""Scale from zero at the gateway: requests for a deployment at zero wait for a replica.

The activator is the gateway's injection point for "ask the auto-scaler to start one"
(in the portal it sends a Celery task; tests/test_e2e_autoscale.py runs that for real);
here it records its calls so the tests can see what the gateway asked for.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.gateway.app import GatewayApp
from tests.gateway_helpers import (
    BEARER,
    MLP,
    Fleet,
    GatewayThread,
    MemoryTableSource,
    deployment,
    features,
    mlp_request,
    replica_route,
    shared_fleet,
    table,
    wait_for,
)

pytestmark = pytest.mark.slow
INFER = f"/v2/models/{MLP}/infer"


@pytest.fixture(scope="module")
def fleet(request, tmp_path_factory) -> Fleet:
    return shared_fleet(request, tmp_path_factory)


class Activations:
    """Records (deployment id, held) for each activation the gateway asks for."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    async def __call__(self, deployment_id: int, held: int) -> None:
        await asyncio.sleep(0)
        with self._lock:
            self.calls.append((deployment_id, held))


@pytest.fixture
def at_zero() -> Iterator[tuple[GatewayThread, MemoryTableSource, Activations]]:
    activations = Activations()
    source = MemoryTableSource(table(deployment(MLP, [], hold_timeout_s=20.0, queue_limit=2)))
    app = GatewayApp(source, activator=activations, poll_interval_s=0.05)
    with GatewayThread(app) as gateway:
        yield gateway, source, activations
        wait_for(lambda: not any(app.cold_starts.held.values()), "no request held", 10)
        assert not any(app.in_flight().values())
        assert not any(app.queue_depth().values())


def _post(gateway: GatewayThread):
    with gateway.client() as client:
        return client.post(INFER, json=mlp_request(features(1)))


def test_a_request_at_zero_is_held_and_served_once_a_replica_is_listed(fleet, at_zero):
    gateway, source, activations = at_zero
    route = source._table.deployments[MLP]
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_post, gateway)
        wait_for(lambda: activations.calls, "the gateway to ask for an activation")
        assert activations.calls[0] == (route.deployment_id, 1)
        assert not pending.done()  # held, not refused
        source.set(table(deployment(MLP, [replica_route(fleet.mlp_v1[0], 1)],
                                    hold_timeout_s=20.0)))
        response = pending.result(timeout=20)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["name"] == "scores"


def test_held_requests_are_reported_again_and_released_when_the_policy_goes(at_zero):
    gateway, source, activations = at_zero
    with ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(_post, gateway) for _ in range(2)]
        # Re-reported about once a second with the current count, so the tick sees it.
        wait_for(lambda: any(held == 2 for _, held in activations.calls),
                 "an activation reporting two held requests", 10)
        source.set(table(deployment(MLP, [], hold_timeout_s=0.0)))
        statuses = [future.result(timeout=10).status_code for future in pending]
    assert statuses == [503, 503]


def test_a_hold_that_times_out_answers_503_with_retry_after(fleet):
    source = MemoryTableSource(table(deployment(MLP, [], hold_timeout_s=0.5)))
    # The hold lasts hold_timeout_s, then the client gets a 503 it can retry.
    with GatewayThread(GatewayApp(source, activator=Activations())) as gateway:
        started = time.monotonic()
        response = _post(gateway)
        waited_s = time.monotonic() - started
        assert not any(gateway.app.cold_starts.held.values())
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "scaled to zero" in response.json()["error"]
    assert 0.5 <= waited_s < 5


def test_without_a_hold_timeout_a_deployment_at_zero_answers_503_at_once(fleet):
    activations = Activations()
    source = MemoryTableSource(table(deployment(MLP, [])))
    with GatewayThread(GatewayApp(source, activator=activations)) as gateway:
        response = _post(gateway)
    assert response.status_code == 503
    assert activations.calls == []


def test_a_replica_listed_since_the_last_poll_serves_the_first_request(fleet):
    # The portal's pages show a replica ready as soon as it reports; a request that finds
    # none in the gateway's table gets one early poll, not a 503 until the next poll.
    source = MemoryTableSource(table(deployment(MLP, [])))
    app = GatewayApp(source, poll_interval_s=3600)
    with GatewayThread(app) as gateway:
        loads_before = source.loads
        source.set(table(deployment(MLP, [replica_route(fleet.mlp_v1[0], 1)])))
        response = _post(gateway)
        assert source.loads == loads_before + 1  # one early poll, no more
    assert response.status_code == 200, response.text


def test_holding_is_bounded_by_the_queue_limit(at_zero):
    gateway, source, _activations = at_zero
    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(_post, gateway) for _ in range(2)]
        wait_for(lambda: gateway.app.cold_starts.held.get(MLP) == 2, "two held requests")
        refused = _post(gateway)
        assert refused.status_code == 503
        assert "hold queue is full" in refused.json()["error"]
        source.set(table(deployment(MLP, [], hold_timeout_s=0.0)))
        assert [future.result(timeout=10).status_code for future in held] == [503, 503]


def test_a_client_that_hangs_up_while_held_is_no_longer_counted(at_zero):
    gateway, _source, _activations = at_zero
    body = json.dumps(mlp_request(features(1))).encode()
    head = (f"POST {INFER} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"authorization: {BEARER['Authorization']}\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as client:
        client.sendall(head + body)
        wait_for(lambda: gateway.app.cold_starts.held.get(MLP) == 1, "the request to be held")
    # Well before the 20 s hold timeout: the hang-up ends the hold.
    wait_for(lambda: gateway.app.cold_starts.held.get(MLP) == 0, "the hold to end", 5)
