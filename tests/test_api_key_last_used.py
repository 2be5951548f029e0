"""An API key's "last used" (issue 15): gateways report the keys they admitted with their
success report, the portal writes last_used_at at most once a minute per key, and the
access page and the API show it."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import httpx
import pytest
from django.test import Client

from serving import services
from serving.gateway.app import GatewayApp
from serving.gateway_api import MAX_KEYS_USED, issue_gateway_token
from serving.models import ApiKey
from serving.services.keys import record_keys_used
from tests.gateway_helpers import (
    SECRET,
    GatewayThread,
    MemoryTableSource,
    api_key,
    deployment,
    replica_route,
    table,
)
from tests.live import LiveGateway, LivePortal
from tests.replica_models import free_port
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db
NOW_S = 1_800_000_000.0


@pytest.fixture
def key(operator) -> ApiKey:
    return services.do_create_api_key(name="ci", user=operator, deployments=None,
                                      expires_in=None, rate_limit_rps=None)[0]


def last_used_s(key: ApiKey) -> float | None:
    key.refresh_from_db()
    return key.last_used_at.timestamp() if key.last_used_at else None


def test_last_used_is_written_at_most_once_a_minute(key):
    assert record_keys_used({key.pk: NOW_S}, NOW_S) == 1
    assert record_keys_used({key.pk: NOW_S + 59}, NOW_S + 59) == 0
    assert last_used_s(key) == NOW_S
    assert record_keys_used({key.pk: NOW_S + 61}, NOW_S + 61) == 1
    assert last_used_s(key) == NOW_S + 61


def test_last_used_never_lies_about_the_future_or_goes_back(key):
    record_keys_used({key.pk: NOW_S + 3600, 999_999: NOW_S}, NOW_S)  # unknown id ignored
    assert last_used_s(key) == NOW_S  # a gateway's clock ahead is clamped to the portal's
    record_keys_used({key.pk: NOW_S - 600}, NOW_S)
    assert last_used_s(key) == NOW_S


def test_a_report_with_keys_is_recorded_and_bad_keys_are_refused(key):
    gateway = Client(headers={"Authorization": f"Bearer {issue_gateway_token('edge')[1]}"})

    def post(body: object):
        return gateway.post("/api/gateway/successes", body, content_type="application/json")
    recent_s = time.time() - 5
    assert post({"replicas": {}, "keys": {str(key.pk): recent_s}}).status_code == 204
    assert last_used_s(key) == pytest.approx(recent_s, abs=1e-3)
    assert post({"replicas": {"3": recent_s}}).status_code == 204  # keys stay optional
    for bad in ([1], {"0": 1.0}, {"x": 1.0}, {"1": "1.0"}, {"1": -1}, {"1": None},
                {str(i): 1.0 for i in range(1, MAX_KEYS_USED + 2)}):
        response = post({"replicas": {}, "keys": bad})
        assert response.status_code == 400 and "key" in response.json()["error"], bad
    response = post({"replicas": {}, "keys": {}, "more": 1})
    assert response.status_code == 400 and "optionally" in response.json()["error"]
    assert Client().post("/api/gateway/successes", {"replicas": {}, "keys": {
        str(key.pk): time.time()}}, content_type="application/json").status_code == 401


def test_the_access_page_and_the_api_show_last_used(client, operator_api, viewer, key):
    client.force_login(viewer)
    row = client.get("/access/").content.decode().split('id="api-keys"')[1]
    assert '<td class="last-used">never</td>' in row
    record_keys_used({key.pk: time.time() - 300}, time.time())
    row = client.get("/access/").content.decode().split('id="api-keys"')[1]
    assert "5\xa0minutes ago</time>" in row and "<th>Last used</th>" in row
    listed = operator_api.get(f"/api/api-keys/{key.pk}/").json()
    assert datetime.fromisoformat(listed["last_used_at"]).timestamp() == last_used_s(key)


class KeysSource(MemoryTableSource):
    """A table source that takes the gateway's reports, keys included."""

    def __init__(self, initial) -> None:
        super().__init__(initial)
        self.reports: list[tuple[dict[int, float], dict[int, float] | None]] = []

    async def report_successes(self, latest_s_by_replica, keys_used_s=None) -> None:
        self.reports.append((latest_s_by_replica, keys_used_s))


def test_the_gateway_reports_the_keys_it_admitted_once_a_second():
    source = KeysSource(table(deployment("m", [replica_route(free_port(), 1)]),
                              keys=[api_key("swk_other", 7, ["m"])]))
    before_s = time.time()
    with GatewayThread(GatewayApp(source, poll_interval_s=0.05)) as gateway:
        for secret in (SECRET, "swk_other", "swk_nobody", SECRET):
            httpx.get(f"{gateway.url}/v2/models/m", headers={
                "Authorization": f"Bearer {secret}"}, timeout=10)
        wait_until(lambda: {1, 7} <= {k for _, keys in source.reports for k in keys or {}},
                   timeout_s=5, what="the gateway reported both keys")
        keys = {k: at_s for _, used in source.reports for k, at_s in (used or {}).items()}
    assert set(keys) == {1, 7}  # the unknown key was refused, never reported
    assert all(before_s <= at_s <= time.time() for at_s in keys.values())
    assert len(source.reports) <= 2


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_standalone_gateway_sets_last_used_on_the_portal(tmp_path, key, operator):
    secret = services.do_create_api_key(name="cli", user=operator, deployments=None,
                                        expires_in=None, rate_limit_rps=None)[1]
    portal = LivePortal(free_port(), tmp_path / "artifacts").start()
    gateway = LiveGateway(portal.url, issue_gateway_token("edge")[1])
    try:
        gateway.start()
        used = ApiKey.objects.get(prefix=secret[:10])
        answer = httpx.get(f"{gateway.url}/v2/models/none", timeout=10,
                           headers={"Authorization": f"Bearer {secret}"})
        assert answer.status_code == 404  # admitted: the key is good, the model unknown
        wait_until(lambda: last_used_s(used) is not None, timeout_s=15,
                   what="the portal to record the key's use")
        assert time.time() - last_used_s(used) < 15
        assert last_used_s(key) is None  # the key nobody sent stays unused
    finally:
        gateway.stop()
        portal.stop()
    assert datetime.now(UTC) >= used.last_used_at
