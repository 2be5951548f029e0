"""The link between a gateway that runs apart and the portal: /api/gateway/ and PortalClient.

API tests drive the views with Django's test client on the test database; the slow test at
the end runs the portal under uvicorn, a real replica and a gateway on PortalClient, and
stops the portal under it.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from django.core.cache import cache
from django.core.management import CommandError, call_command
from django.db import OperationalError
from django.test import Client

from serving import live, services
from serving.gateway.app import GatewayApp
from serving.gateway.portal_source import PortalClient
from serving.gateway.routes import RouteTable
from serving.gateway_api import MAX_SUCCESSES, issue_gateway_token, revoke_gateway_tokens
from serving.gateway_source import share_caps
from serving.models import Deployment, GatewayToken, Node, Replica, ReplicaState
from serving.secrets import digest
from tests.cache_tools import clear_own_cache
from tests.gateway_helpers import GatewayThread, deployment, replica_route, table
from tests.gateway_link_helpers import (
    gateway_rows,
    replica_ready,
    sent_tasks,
    start_node_replica,
)
from tests.live import LivePortal
from tests.replica_models import REPO_ROOT, free_port
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db
TABLE = "/api/gateway/table"
ROW = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4],
                   "data": [0.1, 0.2, 0.3, 0.4]}]}


@pytest.fixture(autouse=True)
def empty_cache():
    """Gateways counted by an earlier test must not split this one's caps."""
    clear_own_cache()


@pytest.fixture
def secret() -> str:
    return issue_gateway_token("edge-1")[1]


@pytest.fixture
def gateway(secret) -> Client:
    return Client(headers={"Authorization": f"Bearer {secret}"})


@pytest.fixture
def instance() -> str:
    return f"gw-{uuid.uuid4().hex[:8]}"


def post(client: Client, what: str, body: object, **kwargs) -> object:
    return client.post(f"/api/gateway/{what}", body, content_type="application/json", **kwargs)


def refused(response, status: int) -> str:
    """Assert a JSON refusal with `status`; return its message."""
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    return response.json()["error"]


# authentication


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Bearer swg_not-a-real-token", "Basic dXNlcjpwdw==",
    "Bearer " + "a" * 10_000])
def test_the_table_needs_a_gateway_token(secret, authorization, django_assert_max_num_queries):
    headers = {} if authorization is None else {"Authorization": authorization}
    # Over-long or malformed credentials are refused before any lookup.
    limit = 1 if authorization == "Bearer swg_not-a-real-token" else 0
    with django_assert_max_num_queries(limit):
        response = Client(headers=headers).get(TABLE)
    assert "gateway token" in refused(response, 401)
    assert response["WWW-Authenticate"] == "Bearer"


def test_a_revoked_token_is_refused_and_a_new_one_works(secret):
    assert Client(headers={"Authorization": f"Bearer {secret}"}).get(TABLE).status_code == 200
    assert revoke_gateway_tokens("edge-1") == 1
    refused(Client(headers={"Authorization": f"Bearer {secret}"}).get(TABLE), 401)
    _token, fresh = issue_gateway_token("edge-1")
    assert Client(headers={"Authorization": f"Bearer {fresh}"}).get(TABLE).status_code == 200


@pytest.mark.parametrize("what", ["sessions", "activations", "successes"])
def test_every_endpoint_needs_the_token(what):
    refused(post(Client(), what, {}), 401)


def test_the_command_prints_only_the_token_and_stores_its_digest():
    out, err = io.StringIO(), io.StringIO()
    call_command("create_gateway_token", "edge-2", stdout=out, stderr=err)
    [line] = out.getvalue().splitlines()
    assert line.startswith("swg_") and len(line) > 40
    token = GatewayToken.objects.get(name="edge-2")
    assert token.token_hash == digest(line) and line not in repr(vars(token))
    with pytest.raises(CommandError, match="in use"):
        call_command("create_gateway_token", "edge-2", stdout=io.StringIO())
    call_command("create_gateway_token", "edge-2", "--revoke", stdout=out, stderr=err)
    assert GatewayToken.objects.get(name="edge-2").status == "revoked"
    with pytest.raises(CommandError, match="no gateway token"):
        call_command("create_gateway_token", "edge-2", "--revoke", stderr=io.StringIO())


# the table


def test_the_table_is_the_route_table_with_an_etag_and_304_until_it_changes(
        gateway, instance, rows, django_assert_num_queries):
    # Only this test's gateway counts: an instance another test made could otherwise leave
    # the 3 s window between the two polls and change the ETag (the cache outlives tests).
    cache.delete(live.GATEWAYS_KEY)
    first = gateway.get(TABLE, {"instance": instance})
    assert first.status_code == 200 and first["Cache-Control"] == "no-store"
    served = RouteTable.from_dict(first.json())
    assert sorted(served.deployments) == ["d0", "d1", "d2"]
    assert len(served.deployments["d0"].replicas) == 2 and len(served.api_keys) == 3
    assert f'"{served.revision}"' == first["ETag"]
    with django_assert_num_queries(1):  # the token; the revision and gateways are cached
        again = gateway.get(TABLE, {"instance": instance}, headers={
            "If-None-Match": first["ETag"]})
    assert again.status_code == 304 and again.content == b""
    live.bump_routes()
    changed = gateway.get(TABLE, {"instance": instance},
                          headers={"If-None-Match": first["ETag"]})
    assert changed.status_code == 200 and changed["ETag"] != first["ETag"]


def test_a_table_costs_the_same_few_queries_however_many_rows(
        gateway, rows, operator, django_assert_max_num_queries):
    with django_assert_max_num_queries(7):  # the token, then at most 6 for the table
        assert gateway.get(TABLE).status_code == 200
    gateway_rows(operator, rows[0].version, deployments=6, keys=10)
    with django_assert_max_num_queries(7):
        assert len(gateway.get(TABLE).json()["deployments"]) == 9


def test_each_cap_is_split_over_the_gateways_that_polled_lately(gateway, instance, rows):
    alone = gateway.get(TABLE, {"instance": instance})
    caps = {name: (d["max_in_flight_per_replica"], d["queue_limit"])
            for name, d in alone.json()["deployments"].items()}
    assert caps == {"d0": (64, 256), "d1": (3, 5), "d2": (1, 1)}
    # The first gateway's table changed: its conditional poll gets the halved caps. The
    # list of instances is a read-modify-write in the cache: a portal process writing it
    # at the same moment can drop the newcomer, who is listed again at its next poll (1 s).
    def halved() -> dict[str, tuple[int, int]] | None:
        gateway.get(TABLE, {"instance": instance + "-b"})
        shared = gateway.get(TABLE, {"instance": instance},
                             headers={"If-None-Match": alone["ETag"]})
        if shared.status_code != 200:
            return None
        caps = {name: (d["max_in_flight_per_replica"], d["queue_limit"])
                for name, d in shared.json()["deployments"].items()}
        return caps if caps["d0"] != (64, 256) else None

    assert wait_until(halved, 3, "the caps to be halved", 0.3) == {
        "d0": (32, 128), "d1": (2, 3), "d2": (1, 1)}


def test_an_unauthenticated_poll_is_not_counted(gateway, instance, rows):
    for intruder in range(5):
        refused(Client().get(TABLE, {"instance": f"intruder-{intruder}"}), 401)
    response = gateway.get(TABLE, {"instance": instance})
    assert response.json()["deployments"]["d0"]["max_in_flight_per_replica"] == 64
    assert response["ETag"].endswith('.1"')


def test_share_caps_rounds_up_and_keeps_at_least_one():
    one = table(deployment("m", [replica_route(9001, 1)], max_in_flight_per_replica=10,
                           queue_limit=7))
    assert share_caps(one, 1) is one
    split = share_caps(one, 3).deployments["m"]
    assert (split.max_in_flight_per_replica, split.queue_limit) == (4, 3)
    split = share_caps(one, 50).deployments["m"]
    assert (split.max_in_flight_per_replica, split.queue_limit) == (1, 1)


def test_instances_are_written_at_most_once_a_second_and_counted_for_three():
    instances = live.GatewayInstances()
    assert instances.note("a", 1000.0) and not instances.note("a", 1000.9)
    assert instances.note("a", 1001.0)
    instances.note("b", 1001.5)
    assert instances.count(1002.0) == 2
    assert instances.count(1004.2) == 1  # a last polled at 1001.0
    assert instances.count(1004.6) == 0


@pytest.mark.parametrize("query", [{"instance": ""}, {"instance": "a" * 65},
                                   {"instance": "bad/id"}, {"instance": "é"}, {"other": "1"}])
def test_a_bad_query_is_refused(gateway, query):
    refused(gateway.get(TABLE, query), 400)


def test_only_get_is_allowed_for_the_table(gateway):
    response = gateway.post(TABLE)
    refused(response, 405)
    assert response["Allow"] == "GET"


def test_a_cache_outage_answers_503_with_retry_after(gateway, settings):
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                   "LOCATION": f"redis://127.0.0.1:{free_port()}/0"}}
    response = gateway.get(TABLE)
    assert "cache" in refused(response, 503)
    assert response["Retry-After"] == "1"


def test_a_database_outage_answers_503(gateway, monkeypatch):
    def broken(revision: str) -> RouteTable:
        raise OperationalError("the database is gone")

    monkeypatch.setattr("serving.gateway_api.route_table", broken)
    assert "database" in refused(gateway.get(TABLE), 503)


# sessions, activations, successes


def test_a_session_is_allowed_only_for_an_active_logged_in_user(gateway, operator):
    browser = Client()
    browser.force_login(operator)
    session_key = browser.session.session_key
    assert post(gateway, "sessions", {"session_key": session_key}).json() == {"allowed": True}
    operator.is_active = False
    operator.save()
    assert post(gateway, "sessions", {"session_key": session_key}).json() == {"allowed": False}
    assert post(gateway, "sessions", {"session_key": "made-up-session-key"}).json() == {
        "allowed": False}


@pytest.mark.parametrize("body", [
    {}, {"session_key": 5}, {"session_key": ""}, {"session_key": "x" * 257},
    {"session_key": "\ud800" * 12}, {"session_key": "a\x00b" * 4}, {"session_key": "é" * 10},
    {"session_key": "abcdefgh", "deployment": "m"}, ["abcdefgh"], None])
def test_bad_session_questions_are_refused(gateway, body):
    refused(post(gateway, "sessions", body), 400)


def test_bodies_must_be_json_objects_of_bounded_size(gateway):
    refused(gateway.post("/api/gateway/sessions", "session_key=x",
                         content_type="application/x-www-form-urlencoded"), 415)
    refused(gateway.post("/api/gateway/sessions", b"{not json", content_type="application/json"),
            400)
    refused(gateway.post("/api/gateway/successes", b'{"replicas": {"1": NaN}}',
                         content_type="application/json"), 400)
    refused(gateway.post("/api/gateway/successes", b'{"replicas": {"1": 1e999}}',
                         content_type="application/json"), 400)
    refused(gateway.post("/api/gateway/activations", b'{"deployment_id": ' + b"9" * 5000 + b"}",
                         content_type="application/json"), 400)
    huge = {"replicas": {str(i): 1.0 for i in range(1, 80_000)}}
    refused(post(gateway, "successes", huge), 413)
    refused(gateway.get("/api/gateway/sessions"), 405)


# In the real-processes group: with a Redis broker a Celery worker that another test runs
# at the same time would take the task from the shared queue first (it failed once in CI).
@pytest.mark.slow
def test_an_activation_sends_the_auto_scalers_task(gateway):
    sent_tasks()  # drain what earlier tests left
    assert post(gateway, "activations", {"deployment_id": 7, "held": 3}).status_code == 202
    assert sent_tasks() == [("scaling.tasks.activate_deployment", [7, 3])]


@pytest.mark.parametrize("body", [
    {"deployment_id": 7}, {"deployment_id": 7, "held": 1, "more": 1},
    {"deployment_id": "7", "held": 1}, {"deployment_id": True, "held": 1},
    {"deployment_id": 0, "held": 1}, {"deployment_id": 7, "held": -1},
    {"deployment_id": 7, "held": 1.5}, {"deployment_id": 2**63, "held": 1},
    {"deployment_id": 7, "held": 10**7}])
def test_bad_activations_are_refused(gateway, body):
    refused(post(gateway, "activations", body), 400)


def test_successes_are_recorded_for_the_offline_sweep(gateway):
    response = post(gateway, "successes", {"replicas": {"11": 1700000000.5, "12": 1700000001}})
    assert response.status_code == 204
    assert live.replica_successes([11, 12, 13]) == {11: 1700000000.5, 12: 1700000001.0}


@pytest.mark.parametrize("replicas", [
    [1], {"0": 1.0}, {"-1": 1.0}, {"²": 1.0}, {" 1": 1.0}, {"1": True}, {"1": "1.0"},
    {"1": -5}, {"1": None}, {"1": 10**400}, {str(i): 1.0 for i in range(1, MAX_SUCCESSES + 2)}])
def test_bad_successes_are_refused(gateway, replicas):
    refused(post(gateway, "successes", {"replicas": replicas}), 400)


def test_the_portal_client_imports_no_django():
    code = ("import sys, serving.gateway.portal_source; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'django'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.fixture
def rows(operator, model, model_files):
    """Three deployments (caps 64/256, 3/5, 1/1) with two ready replicas each, three keys."""
    from tests.factories import add_version

    version = add_version(model, operator, model_files["torchscript"])
    return gateway_rows(operator, version, deployments=3, keys=3,
                        caps=[(64, 256), (3, 5), (1, 1)])


# a gateway apart from the portal, for real


@pytest.fixture
def linked(operator, model, model_files, tmp_path):
    """The portal under uvicorn, one ready replica in its table, a gateway token."""
    from tests.factories import add_version

    version = add_version(model, operator, model_files["torchscript"])
    node = Node.objects.create(name="n", address="127.0.0.1", secret_hash="0" * 64)
    replica = start_node_replica(node, model_files["torchscript"], tmp_path)
    portal = LivePortal(free_port(), tmp_path / "artifacts")
    try:
        wait_until(lambda: replica_ready(replica, node), 60, "the replica to load")
        mlp = Deployment.objects.create(name="mlp", model=model, version=version,
                                        created_by=operator)
        Replica.objects.create(deployment=mlp, version=version, node=node, port=replica.port,
                               state=ReplicaState.READY)
        live.bump_routes()
        portal.start()
        yield {"portal": portal, "secret": issue_gateway_token("edge")[1],
               "cache_path": tmp_path / "table.json"}
    finally:
        portal.stop()
        replica.stop()


def new_key(operator) -> dict[str, str]:
    return {"Authorization": "Bearer " + services.do_create_api_key(
        name="k", user=operator, deployments=None, expires_in=None, rate_limit_rps=None)[1]}


def infer(gateway: GatewayThread, headers: dict[str, str], **kwargs) -> int:
    return httpx.post(f"{gateway.url}/v2/models/mlp/infer", json=ROW, headers=headers,
                      timeout=10, **kwargs).status_code


def knows(gateway: GatewayThread, headers: dict[str, str]) -> bool:
    """Return whether the gateway's table in use has the key in `headers`."""
    secret = headers["Authorization"].removeprefix("Bearer ")
    return digest(secret) in gateway.app.table.api_keys


def learns_within(gateway: GatewayThread, headers: dict[str, str], what: str) -> float:
    """Return the seconds until the gateway's table has the key, once it serves with it."""
    started_s = time.monotonic()
    wait_until(lambda: knows(gateway, headers), 10, what, interval_s=0.005)
    took_s = time.monotonic() - started_s
    assert infer(gateway, headers) == 200
    return took_s


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_gateway_apart_from_the_portal_keeps_serving_while_the_portal_is_away(
        linked, operator):
    portal, cache_path = linked["portal"], linked["cache_path"]
    client = PortalClient(portal.url, linked["secret"], table_cache_path=cache_path,
                          instance_id="edge-a", timeout_s=0.5)
    first_key = new_key(operator)
    with GatewayThread(GatewayApp(client, client, activator=client.activate)) as gateway:
        wait_until(lambda: infer(gateway, first_key) == 200, 30, "the first request")
        browser = Client()
        browser.force_login(operator)
        cookie = {"sessionid": browser.cookies["sessionid"].value}
        assert infer(gateway, {}, cookies=cookie) == 200  # asked the portal: allowed
        after_start_s = learns_within(gateway, new_key(operator), "a key made after start")
        assert after_start_s < 1.0
        assert oct(cache_path.stat().st_mode & 0o777) == "0o600"

        os.kill(portal.proc.pid, signal.SIGSTOP)  # frozen: polls time out
        try:
            stopped_s = time.monotonic()
            key_made_while_stopped = new_key(operator)
            while time.monotonic() - stopped_s < 2.0:  # four poll timeouts
                assert infer(gateway, first_key) == 200
            # The gateway really could not learn anything meanwhile.
            assert not knows(gateway, key_made_while_stopped)
            assert infer(gateway, key_made_while_stopped) == 401
        finally:
            os.kill(portal.proc.pid, signal.SIGCONT)
        back_s = learns_within(gateway, key_made_while_stopped, "the key made while stopped")
        print(f"new key in the table after {after_start_s:.3f} s; {back_s:.3f} s after SIGCONT")
        assert back_s < 1.0, f"{back_s:.2f} s after the portal came back"

        portal.stop()  # gone: polls are refused
        gone_s = time.monotonic()
        key_made_while_gone = new_key(operator)
        while time.monotonic() - gone_s < 1.0:
            assert infer(gateway, key_made_while_stopped) == 200
        assert not knows(gateway, key_made_while_gone)
        assert infer(gateway, key_made_while_gone) == 401

    # A gateway started while the portal is away serves the table its predecessor saved.
    restarted = PortalClient(portal.url, linked["secret"], table_cache_path=cache_path,
                             instance_id="edge-b", timeout_s=0.5)
    assert restarted.cached_table() is not None
    with GatewayThread(GatewayApp(restarted, restarted)) as gateway:
        wait_until(lambda: infer(gateway, key_made_while_stopped) == 200, 10, "the saved table")
