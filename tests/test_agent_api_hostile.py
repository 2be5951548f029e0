"""Hostile input on the agent API: every refusal is a 4xx with a JSON body, never a 500."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from serving import services
from serving.models import Deployment, Gpu, Node, Replica
from serving.services import nodes as node_services
from serving.services.nodes import Unauthorized
from swarm_protocol.agent_messages import HeartbeatRequest

pytestmark = pytest.mark.django_db(transaction=True)

DEVICE = {"index": 0, "kind": "cpu", "name": "Test CPU", "uuid": "cpu-0",
          "memory_total_bytes": 16 * 1024**3, "memory_used_bytes": 1024**3,
          "utilization_pct": 5.0}
SHA = "a" * 64
AGENT_PATHS = ("/api/agent/heartbeat", "/api/agent/deregister", f"/api/agent/artifacts/{SHA}")


def client() -> Client:
    # Unhandled exceptions become the 500 page a real server would send, not a raise.
    return Client(raise_request_exception=False)


def call(path: str, body: Any = None, authorization: str = "",
         content_type: str = "application/json") -> Any:
    headers = {"Authorization": authorization} if authorization else {}
    if path.startswith("/api/agent/artifacts/"):
        return client().get(path, headers=headers)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client().generic("POST", path, data, content_type=content_type, headers=headers)


def assert_json_refusal(response: Any, status: int) -> str:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"] == "application/json"
    return response.json()["error"]


@pytest.fixture
def node_secret(join_secret: str) -> str:
    reply = call("/api/agent/register", {"join_token": join_secret, "name": "n1",
                                         "address": "127.0.0.1", "cost_per_hour": 0.5,
                                         "devices": [DEVICE]})
    assert reply.status_code == 201, reply.content
    return reply.json()["node_secret"]


@pytest.mark.parametrize("path", AGENT_PATHS)
@pytest.mark.parametrize("secret", [
    "swn_\u00b2_x",  # a digit to str.isdigit(), not to int()
    "swn_" + "9" * 5000 + "_x",  # beyond int()'s digit limit
    "swn_99999999999999999999_x",  # beyond a 64-bit primary key
    "swn_1_" + "x" * 5000,  # over-long: refused before any parsing or lookup
    "swn_\u0661_x",  # an Arabic-Indic digit
    "swn_1_\u00e9t\u00e9",
])
def test_malformed_node_secrets_get_401_json(node_secret, path, secret):
    error = assert_json_refusal(call(path, {"devices": [], "replicas": []},
                                     authorization=f"Bearer {secret}"), 401)
    assert "node secret" in error


def test_an_over_long_secret_is_refused_without_a_database_query(node_secret,
                                                                 django_assert_num_queries):
    with django_assert_num_queries(0), pytest.raises(Unauthorized):
        services.authenticate_node("Bearer swn_1_" + "x" * 100_000)


def long_name(n: int) -> str:
    return "n" * n


@pytest.mark.parametrize(("body", "fragment"), [
    ({"devices": [], "replicas": [], "cached_artifacts": [1, {}]}, "cached_artifacts[0]"),
    ({"devices": [{**DEVICE, "memory_total_bytes": 10**23}], "replicas": []},
     "devices[0].memory_total_bytes"),
    ({"devices": [{**DEVICE, "name": long_name(201)}], "replicas": []}, "devices[0].name"),
    ({"devices": [{**DEVICE, "uuid": long_name(101)}], "replicas": []}, "devices[0].uuid"),
    ({"devices": [{**DEVICE, "index": 2**40}], "replicas": []}, "devices[0].index"),
    ({"devices": [{**DEVICE, "index": -1}], "replicas": []}, "devices[0].index"),
    ({"devices": [], "replicas": [{"replica_id": 10**30, "state": "ready"}]},
     "replicas[0].replica_id"),
    ({"devices": [], "replicas": [{"replica_id": 1, "state": "ready", "port": 10**12}]},
     "replicas[0].port"),
    ({"devices": [], "replicas": [{"replica_id": 1, "state": "ready", "in_flight": 10**20}]},
     "replicas[0].in_flight"),
    ({"devices": [], "replicas": [{"replica_id": 1, "state": "x" * 17}]}, "replicas[0].state"),
    ({"devices": [], "replicas": [{"replica_id": 1, "state": "ready", "error": "a\x00b"}]},
     "replicas[0].error"),
    ({"devices": [], "replicas": [], "cached_artifacts": ["\ud800"]}, "cached_artifacts[0]"),
    ({"devices": [{**DEVICE, "utilization_pct": 10**400}], "replicas": []},
     "devices[0].utilization_pct"),
    ({"devices": [], "replicas": [[]]}, "replicas[0]"),
    ({"devices": {}, "replicas": []}, "devices must be a list"),
])
def test_out_of_bounds_heartbeats_get_400_naming_the_field(node_secret, body, fragment):
    response = call("/api/agent/heartbeat", body, authorization=f"Bearer {node_secret}")
    assert fragment in assert_json_refusal(response, 400)
    assert not Gpu.objects.filter(name__startswith="nnn").exists()


@pytest.mark.parametrize("raw", [
    b'{"devices": [], "replicas": [{"replica_id": 1, "state": "ready", "mean_in_flight": NaN}]}',
    b'{"devices": [{"index": 0, "kind": "cpu", "name": "c", "uuid": "u", '
    b'"memory_total_bytes": 1, "memory_used_bytes": 1, "utilization_pct": Infinity}], '
    b'"replicas": []}'])
def test_non_finite_numbers_are_refused(node_secret, raw):
    response = call("/api/agent/heartbeat", raw, authorization=f"Bearer {node_secret}")
    assert_json_refusal(response, 400)


def test_registration_refuses_what_the_node_row_cannot_hold(join_secret):
    body = {"join_token": join_secret, "name": "n1", "address": "h", "cost_per_hour": 0.5,
            "devices": [DEVICE]}
    for bad, fragment in (({"name": long_name(101)}, "name"),
                          ({"labels": {"a": "\ud800"}}, "labels"),
                          ({"labels": {"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]
                                                  ]]]]]]]]]]]]]]]]}}, "nested too deeply"),
                          ({"cost_per_hour": float("inf")}, "cost_per_hour"),
                          # gateways' in-process names for tunnel nodes (never an address)
                          ({"address": "node-5.tunnel.invalid"}, "address"),
                          ({"address": "X.INVALID."}, "address"),
                          ({"join_token": "\ud800"}, "join_token")):
        response = call("/api/agent/register", {**body, **bad})
        assert fragment in assert_json_refusal(response, 400)
    assert not Node.objects.exists()


def test_bodies_that_are_not_json_get_415_and_broken_json_400(node_secret):
    auth = f"Bearer {node_secret}"
    assert_json_refusal(call("/api/agent/heartbeat", b"devices=1", auth,
                             content_type="application/x-www-form-urlencoded"), 415)
    assert_json_refusal(call("/api/agent/heartbeat", b"{}", auth, content_type="text/plain"),
                        415)
    assert "not valid JSON" in assert_json_refusal(
        call("/api/agent/heartbeat", b"{oops", auth), 400)
    assert "not valid JSON" in assert_json_refusal(
        call("/api/agent/heartbeat", b"\xff\xfe", auth), 400)
    deep = b"[" * 100_000 + b"]" * 100_000
    assert "not valid JSON" in assert_json_refusal(call("/api/agent/heartbeat", deep, auth),
                                                   400)
    assert_json_refusal(call("/api/agent/register", b"{}", content_type="text/html"), 415)


def test_wrong_methods_get_405_json(node_secret):
    for path in ("/api/agent/register", "/api/agent/heartbeat", "/api/agent/deregister"):
        assert_json_refusal(client().get(path), 405)
    assert_json_refusal(client().post(f"/api/agent/artifacts/{SHA}"), 405)


def test_an_artifact_name_that_is_not_a_sha256_is_a_404_json(node_secret):
    for name in ("x" * 5000, "A" * 64, "..%2E", "\u00b2" * 64):
        response = client().get(f"/api/agent/artifacts/{name}",
                                headers={"Authorization": f"Bearer {node_secret}"})
        assert_json_refusal(response, 404)


def test_a_heartbeat_while_its_deployment_is_deleted_is_not_a_500(
        gpu_node, served_deployment, monkeypatch):
    """The replica row goes between the heartbeat reading it and writing its new state."""
    replica = Replica.objects.get(deployment=served_deployment)
    original = node_services._next_state

    def deleted_meanwhile(row, status):
        Deployment.objects.filter(pk=row.deployment_id).delete()
        return original(row, status)

    monkeypatch.setattr(node_services, "_next_state", deleted_meanwhile)
    reply = services.do_heartbeat(gpu_node, HeartbeatRequest.from_dict({
        "devices": [DEVICE], "replicas": [{"replica_id": replica.pk, "state": "ready",
                                           "port": 9100}]}))
    assert reply.desired == []
    assert not Replica.objects.filter(pk=replica.pk).exists()


def test_a_heartbeat_from_a_node_removed_meanwhile_is_a_401(gpu_node):
    node = services.authenticate_node(f"Bearer {gpu_node.secret}")
    services.do_remove_node(Node.objects.get(pk=node.pk))  # between auth and the heartbeat
    with pytest.raises(Unauthorized):
        services.do_heartbeat(node, HeartbeatRequest(devices=[], replicas=[]))
