"""Serving REST API and agent API over HTTP: shapes, secrets shown once, 4xx JSON."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from serving.models import JoinToken, Node, Replica
from tests.factories import add_version

pytestmark = pytest.mark.django_db(transaction=True)

DEVICE = {"index": 0, "kind": "cpu", "name": "Test CPU", "uuid": "cpu-0",
          "memory_total_bytes": 16 * 1024**3, "memory_used_bytes": 1024**3,
          "utilization_pct": 5.0}


def create_token(api, **extra) -> str:
    response = api.post("/api/join-tokens/", {"name": "lab", **extra}, format="json")
    assert response.status_code == 201, response.content
    return response.json()["token"]


def join(token: str, name: str = "n1") -> dict:
    response = APIClient().post("/api/agent/register", {
        "join_token": token, "name": name, "address": "127.0.0.1", "cost_per_hour": 0.5,
        "devices": [DEVICE]}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def test_join_token_secret_is_shown_once(operator_api):
    token = create_token(operator_api, uses=1, expires_in_hours=2)
    listing = operator_api.get("/api/join-tokens/").json()["results"]
    assert "token" not in listing[0]
    assert token not in str(listing)
    assert listing[0]["uses_left"] == 1
    assert JoinToken.objects.get().token_hash != token


def test_agent_register_heartbeat_and_deregister_over_http(operator_api):
    reply = join(create_token(operator_api))
    agent = APIClient()
    agent.credentials(HTTP_AUTHORIZATION=f"Bearer {reply['node_secret']}")
    beat = agent.post("/api/agent/heartbeat", {"devices": [DEVICE], "replicas": []},
                      format="json")
    assert beat.status_code == 200
    assert beat.json()["desired"] == []
    assert beat.json()["replica_key"] == reply["replica_key"]
    nodes = operator_api.get("/api/nodes/").json()["results"]
    assert nodes[0]["live_devices"][0]["utilization_pct"] == 5.0
    assert agent.post("/api/agent/deregister").status_code == 204
    assert Node.objects.get().status == "offline"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"devices": "x", "replicas": []}, "devices must be a list"),
        ({"devices": [{**DEVICE, "index": "zero"}], "replicas": []}, "devices[0].index"),
        ({"devices": [DEVICE]}, "replicas is required"),
        ({"devices": [DEVICE], "replicas": [{"replica_id": 1}]}, "replicas[0].state"),
    ],
)
def test_malformed_heartbeats_get_400_json(operator_api, body, fragment):
    reply = join(create_token(operator_api))
    agent = APIClient()
    agent.credentials(HTTP_AUTHORIZATION=f"Bearer {reply['node_secret']}")
    response = agent.post("/api/agent/heartbeat", body, format="json")
    assert response.status_code == 400
    assert fragment in response.json()["error"]


def test_agent_calls_without_a_valid_secret_get_401(operator_api):
    join(create_token(operator_api))
    agent = APIClient()
    assert agent.post("/api/agent/heartbeat", {}, format="json").status_code == 401
    agent.credentials(HTTP_AUTHORIZATION="Bearer swn_1_forged")
    response = agent.post("/api/agent/heartbeat", {"devices": [], "replicas": []},
                          format="json")
    assert response.status_code == 401
    assert "node secret" in response.json()["error"]
    bad_json = agent.generic("POST", "/api/agent/register", b"{oops",
                             content_type="application/json")
    assert bad_json.status_code == 400
    assert "not valid JSON" in bad_json.json()["error"]
    refused = APIClient().post("/api/agent/register", {
        "join_token": "swj_nope", "name": "x", "address": "h", "cost_per_hour": 0,
        "devices": []}, format="json")
    assert refused.status_code == 401


def test_deployment_create_scale_and_delete(operator_api, operator, model, model_files):
    add_version(model, operator, model_files["torchscript"])
    token = create_token(operator_api)
    join(token, "n1")
    join(token, "n2")
    created = operator_api.post("/api/deployments/", {"name": "mlp", "model": model.name,
                                                      "version": 1, "replicas": 2},
                                format="json")
    assert created.status_code == 201, created.content
    assert created.json()["version"] == 1
    nodes = sorted(Replica.objects.values_list("node__name", flat=True))
    assert nodes == ["n1", "n2"]
    scaled = operator_api.post("/api/deployments/mlp/scale/", {"replicas": 1}, format="json")
    assert scaled.json()["replicas"] == 1
    assert Replica.objects.filter(desired=True).count() == 1
    bad = operator_api.post("/api/deployments/mlp/scale/", {"replicas": -1}, format="json")
    assert bad.status_code == 400
    assert operator_api.delete("/api/deployments/mlp/").status_code == 204
    assert operator_api.get("/api/deployments/mlp/").json()["deleting"] is True


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"name": "d", "model": "mlp"}, 400, "either version or alias"),
        ({"name": "d", "model": "mlp", "version": 4}, 400, "no version 4"),
        ({"name": "d", "model": "mlp", "alias": "prod"}, 400, "no alias"),
        ({"name": "d", "model": "nope", "version": 1}, 404, ""),
        ({"name": "bad name", "model": "mlp", "version": 1}, 400, "name:"),
    ],
)
def test_bad_deployments_are_refused(operator_api, operator, model, model_files, body, status,
                                     fragment):
    add_version(model, operator, model_files["torchscript"])
    response = operator_api.post("/api/deployments/", body, format="json")
    assert response.status_code == status
    assert fragment in response.json()["error"]


def test_viewer_cannot_manage_serving(viewer_api):
    assert viewer_api.get("/api/nodes/").status_code == 200
    assert viewer_api.post("/api/join-tokens/", {"name": "x"}, format="json"
                           ).status_code == 403
    assert viewer_api.post("/api/deployments/", {}, format="json").status_code == 403
