"""Hostile input to the management API and the WebSocket router: a clear 4xx, never a 500."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from channels.testing import WebsocketCommunicator
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from serving import services
from serving.models import DeploymentRevision
from swarm_portal.asgi import application
from tests.conftest import free_port
from tests.live import ROOT, test_database_url
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

HUGE_INT = "394273133719593723610791936"
LIST_ENDPOINTS = ["/api/models/", "/api/nodes/", "/api/join-tokens/", "/api/deployments/",
                  "/api/replicas/", "/api/api-keys/", "/api/scaling-events/",
                  "/api/models/mlp/versions/", "/api/models/mlp/alias-history/",
                  "/api/deployments/mlp/revisions/", "/api/models/mlp/aliases/prod/history/"]


def error_of(response) -> str:
    """Return the {"error": ...} message of a 4xx, failing on any other shape."""
    assert 400 <= response.status_code < 500, (response.status_code, response.content[:300])
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    return body["error"]


@pytest.fixture
def deployment(served_deployment, model, operator):
    from registry import services as registry_services

    registry_services.do_move_alias(model=model, alias_name="prod",
                                    version=served_deployment.version, user=operator)
    return served_deployment


# --- WebSockets ----------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/ws/nope/", "/", "/ws/overview/extra", "/v2/ws"])
async def test_an_unknown_websocket_path_is_refused_without_an_exception(path):
    socket = WebsocketCommunicator(application, path, headers=[(b"host", b"localhost"), (b"origin", b"http://localhost")])
    connected, code = await socket.connect(timeout=5)
    assert not connected
    assert code in (403, 4404, 1000)
    await socket.disconnect()


@pytest.mark.slow
def test_a_live_portal_refuses_unknown_websocket_paths_without_a_traceback(tmp_path,
                                                                          artifact_root):
    port, log = free_port(), tmp_path / "portal.log"
    env = {**os.environ, "DATABASE_URL": test_database_url(), "ARTIFACT_ROOT": str(artifact_root)}
    with log.open("wb") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "swarm_portal.asgi:application", "--port",
             str(port), "--log-level", "info"], cwd=ROOT, env=env, stdout=output, stderr=output)
    try:
        # "Uvicorn running on" is logged once the port listens; "startup complete" is earlier.
        wait_until(lambda: b"Uvicorn running on" in log.read_bytes(), 60, "uvicorn")
        for path in ("/ws/nope/", "/ws/", "/ws/overview/x"):
            url, origin = f"ws://127.0.0.1:{port}{path}", f"http://127.0.0.1:{port}"
            with pytest.raises(InvalidStatus) as refused, connect(url, open_timeout=30,
                                                                   origin=origin):
                pass
            assert refused.value.response.status_code == 403
        wait_until(lambda: log.read_bytes().count(b"403") >= 3, 10, "the refusals logged")
    finally:
        server.terminate()
        server.wait(timeout=15)
    assert b"Traceback" not in log.read_bytes()
    # Not a bare b"500": the log names the server's pid, which may contain it.
    assert b"500 Internal Server Error" not in log.read_bytes()
    assert b"Exception in ASGI application" not in log.read_bytes()


# --- pagination ----------------------------------------------------------------------------

BAD_PAGING = [f"limit={HUGE_INT}", f"offset={HUGE_INT}", "limit=-1", "limit=abc", "offset=1.5",
              "limit=0x10", "limit=%00", "limit=1001", "limit=0", "offset=-1"]


def test_every_list_endpoint_refuses_a_bad_limit_or_offset(operator_api, deployment):
    wrong = {}
    for endpoint in LIST_ENDPOINTS:
        for query in BAD_PAGING:
            response = operator_api.get(f"{endpoint}?{query}")
            if response.status_code != 400 or query.split("=")[0] not in error_of(response):
                wrong[f"{endpoint}?{query}"] = response.status_code
    assert wrong == {}


def test_every_list_endpoint_pages_within_its_maximum(operator_api, deployment):
    for endpoint in LIST_ENDPOINTS:
        response = operator_api.get(f"{endpoint}?limit=1000&offset=0")
        assert response.status_code == 200, (endpoint, response.content)
        assert "results" in response.json()
        assert operator_api.get(f"{endpoint}?limit=1&offset=1000000000").status_code == 200


# --- query filters -------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["%00", "a%00b", "%1b[31m", "x" * 1000])
def test_query_filters_refuse_control_characters_and_long_values(operator_api, deployment,
                                                                 value):
    for endpoint in ["/api/scaling-events/", "/api/replicas/"]:
        message = error_of(operator_api.get(f"{endpoint}?deployment={value}"))
        assert "deployment" in message


def test_a_query_filter_still_filters(operator_api, deployment):
    hits = operator_api.get("/api/replicas/?deployment=mlp").json()["results"]
    misses = operator_api.get("/api/replicas/?deployment=other").json()["results"]
    assert hits and all(replica["deployment"] == "mlp" for replica in hits)
    assert misses == []


def test_any_query_parameter_with_a_nul_is_refused(operator_api, deployment):
    assert "q" in error_of(operator_api.get("/api/nodes/?q=%00"))


# --- numbers -------------------------------------------------------------------------------

NUMBERS_OUT_OF_BOUNDS = [
    ("/api/join-tokens/", {"name": "x", "expires_in_hours": 1e300}),
    ("/api/join-tokens/", {"name": "x", "uses": int(HUGE_INT)}),
    ("/api/api-keys/", {"name": "x", "expires_in_hours": 1e300}),
    ("/api/api-keys/", {"name": "x", "rate_limit_rps": 1e300}),
    ("/api/api-keys/", {"name": "x", "burst": int(HUGE_INT)}),
    ("/api/deployments/", {"name": "big", "model": "mlp", "version": int(HUGE_INT)}),
    ("/api/deployments/", {"name": "big", "model": "mlp", "version": 1,
                           "memory_bytes": int(HUGE_INT)}),
    ("/api/deployments/mlp/rollback/", {"revision": int(HUGE_INT)}),
]


def test_numbers_out_of_bounds_are_refused(operator_api, deployment):
    for endpoint, body in NUMBERS_OUT_OF_BOUNDS:
        response = operator_api.post(endpoint, body, format="json")
        assert response.status_code == 400, (endpoint, body, response.content[:200])
        error_of(response)


def test_deployment_changes_and_alias_moves_out_of_bounds_are_refused(operator_api,
                                                                     deployment):
    for body in ({"version": int(HUGE_INT)}, {"traffic": {HUGE_INT: 1}}, {"traffic": {"²": 1}},
                 {"traffic": {str(n): 1 for n in range(1, 100)}}):
        response = operator_api.patch("/api/deployments/mlp/", body, format="json")
        assert response.status_code == 400, (body, response.content[:200])
    response = operator_api.patch("/api/deployments/mlp/", '{"traffic": {"1": 1e400}}',
                                  content_type="application/json")
    assert "too large" in error_of(response)
    response = operator_api.put("/api/models/mlp/aliases/prod/", {"version": int(HUGE_INT)},
                                format="json")
    assert response.status_code == 400
    assert DeploymentRevision.objects.count() == 1


def test_a_huge_id_in_the_path_is_not_found(operator_api, deployment):
    for path in [f"/api/models/mlp/versions/{HUGE_INT}/",
                 f"/api/models/mlp/versions/{HUGE_INT}/artifact",
                 f"/api/nodes/{HUGE_INT}/", f"/api/join-tokens/{HUGE_INT}/",
                 f"/api/scaling-events/{HUGE_INT}/", f"/api/replicas/{HUGE_INT}/"]:
        assert operator_api.get(path).status_code == 404, path


# --- bodies --------------------------------------------------------------------------------

NOT_JSON = [
    ("patch", "/api/deployments/mlp/", {"replicas": 3}),
    ("post", "/api/deployments/mlp/rollback/", {"revision": 1}),
    ("post", "/api/deployments/mlp/scale/", {"replicas": 3}),
    ("post", "/api/join-tokens/", {"name": "x"}),
    ("put", "/api/models/mlp/aliases/prod/", {"version": 1}),
    ("patch", "/api/models/mlp/", {"description": "x"}),
    ("put", "/api/deployments/mlp/policy/", {"max_replicas": 2}),
    ("post", "/api/api-keys/", {"name": "x"}),
    ("post", "/api/deployments/", {"name": "d2", "model": "mlp", "version": 1}),
    ("post", "/api/models/", {"name": "m2"}),
]


@pytest.fixture
def schema(operator_api) -> dict:
    response = operator_api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    return response.json()


def json_writes(schema: dict) -> list[tuple[str, str]]:
    """Return (method, path) of every DRF operation with a JSON body, path filled in."""
    found = []
    for template, item in schema["paths"].items():
        for method, operation in item.items():
            content = operation.get("requestBody", {}).get("content", {})
            if "application/json" in content and not template.startswith("/api/agent/"):
                name = "prod" if "/aliases/" in template else "mlp"
                path = (template.replace("{model_name}", "mlp").replace("{name}", name)
                        .replace("{id}", "1"))
                found.append((method, path))
    return found


def test_the_schema_names_the_json_write_operations(schema):
    assert set(json_writes(schema)) >= {(method, path) for method, path, _body in NOT_JSON}


@pytest.mark.parametrize("form", ["multipart", "urlencoded", "text"])
def test_every_json_write_refuses_a_body_that_is_not_json_with_415(operator_api, deployment,
                                                                   schema, form):
    for method, endpoint in json_writes(schema):
        send = getattr(operator_api, method)
        body = {"name": "n", "replicas": 3, "revision": 1, "version": 1, "description": "d"}
        if form == "multipart":
            response = send(endpoint, body, format="multipart")
        elif form == "urlencoded":
            response = send(endpoint, "&".join(f"{k}={v}" for k, v in body.items()),
                            content_type="application/x-www-form-urlencoded")
        else:
            response = send(endpoint, str(body), content_type="text/plain")
        assert response.status_code == 415, (method, endpoint, response.content[:200])
        assert "media type" in error_of(response)
    assert DeploymentRevision.objects.count() == 1


def test_every_json_write_refuses_an_unknown_field(operator_api, deployment, schema):
    for method, endpoint in json_writes(schema):
        response = getattr(operator_api, method)(endpoint, {"zz_unknown": 1}, format="json")
        assert response.status_code == 400, (method, endpoint, response.content[:200])
        assert response.json()["fields"]["zz_unknown"] == ["unknown field"]
    assert DeploymentRevision.objects.count() == 1


def request_properties(schema: dict):
    components = schema["components"]["schemas"]

    def resolve(node: dict) -> dict:
        while "$ref" in node:
            node = components[node["$ref"].rsplit("/", 1)[1]]
        return node

    for template, item in schema["paths"].items():
        for method, operation in item.items():
            for media in operation.get("requestBody", {}).get("content", {}).values():
                body = resolve(media["schema"])
                for name, prop in body.get("properties", {}).items():
                    yield f"{method} {template} {name}", resolve(prop)


def test_every_request_field_in_the_schema_is_bounded(schema):
    unbounded = []
    for where, prop in request_properties(schema):
        kind = prop.get("type")
        if kind == "integer" and not {"minimum", "maximum"} <= set(prop):
            unbounded.append(where)
        # The agent protocol (swarm_protocol/agent_messages.py) bounds its floats by
        # finiteness only.
        if kind == "number" and "maximum" not in prop and "/api/agent/" not in where:
            unbounded.append(where)
        if kind == "string" and not ({"maxLength", "enum"} & set(prop)) and (
                prop.get("format") != "binary"):
            unbounded.append(where)
        if kind == "array" and "maxItems" not in prop:
            unbounded.append(where)
    assert unbounded == []


def test_the_schema_documents_the_error_answers_and_every_path(schema):
    for template, item in schema["paths"].items():
        for method, operation in item.items():
            codes = set(operation["responses"])
            expected = {"400", "403"} | ({"404"} if "{" in template else set())
            assert expected <= codes, (method, template, codes)
            error = operation["responses"]["400"]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/Error"}
    assert schema["components"]["schemas"]["Error"]["required"] == ["error"]
    aliases = schema["paths"]["/api/models/{model_name}/aliases/"]["get"]
    assert aliases["responses"]["200"]["content"]["application/json"]["schema"]["type"] == "array"
    assert {"/api/agent/register", "/api/agent/heartbeat", "/api/agent/deregister",
            "/api/agent/artifacts/{sha256}",
            "/api/models/{model_name}/versions/{number}/artifact"} <= set(schema["paths"])


def test_an_unpaged_list_answers_what_the_schema_says(operator_api, deployment):
    listed = operator_api.get("/api/models/mlp/aliases/").json()
    assert listed == [{"name": "prod", "version": 1, "updated_at": listed[0]["updated_at"]}]


UNKNOWN_FIELDS = [
    ("patch", "/api/deployments/mlp/", {"replicas": 1, "replicaz": 3}),
    ("post", "/api/deployments/mlp/rollback/", {"revision": 1, "force": True}),
    ("post", "/api/deployments/mlp/scale/", {"replicas": 1, "why": "x"}),
    ("post", "/api/join-tokens/", {"name": "x", "usess": 1}),
    ("post", "/api/join-tokens/", {"name": "x", "uses_left": 1}),
    ("post", "/api/api-keys/", {"name": "x", "rate_limit": 1}),
    ("post", "/api/deployments/", {"name": "d2", "model": "mlp", "version": 1, "gpu": 1}),
    ("put", "/api/models/mlp/aliases/prod/", {"version": 1, "pin": True}),
    ("patch", "/api/models/mlp/", {"description": "x", "owner": "someone"}),
    ("post", "/api/models/", {"name": "m2", "colour": "red"}),
    ("put", "/api/deployments/mlp/policy/", {"max_replicas": 2, "min_replica": 1}),
    ("patch", "/api/deployments/mlp/policy/", {"max_replica": 2}),
]
KNOWN = {"replicas", "revision", "name", "model", "version", "description", "max_replicas",
         "min_replicas"}


def test_unknown_and_read_only_fields_are_refused(operator_api, deployment):
    for method, endpoint, body in UNKNOWN_FIELDS:
        response = getattr(operator_api, method)(endpoint, body, format="json")
        assert response.status_code == 400, (method, endpoint, response.content[:200])
        unknown = (set(body) - KNOWN).pop()
        assert unknown in error_of(response)
        assert response.json()["fields"][unknown][0] in ("unknown field", "read-only field")
    assert DeploymentRevision.objects.count() == 1
    assert operator_api.get("/api/models/m2/").status_code == 404


def test_a_json_body_that_is_not_an_object_is_refused(operator_api, deployment):
    for method, endpoint, _body in NOT_JSON:
        for body in ["[1, 2]", '"text"', "3", "null", "{", "NaN", '{"replicas": Infinity}']:
            response = getattr(operator_api, method)(endpoint, body,
                                                     content_type="application/json")
            assert response.status_code == 400, (method, endpoint, body, response.content)
            error_of(response)


def test_a_json_body_over_the_size_limit_is_refused_with_413(operator_api, deployment, settings):
    body = '{"description": "' + "d" * settings.DATA_UPLOAD_MAX_MEMORY_SIZE + '"}'
    response = operator_api.patch("/api/models/mlp/", body, content_type="application/json")
    assert response.status_code == 413
    assert "larger than" in error_of(response)


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_json_is_refused(operator_api, deployment, depth):
    body = '{"traffic": ' + "[" * depth + "]" * depth + "}"
    response = operator_api.patch("/api/deployments/mlp/", body,
                                  content_type="application/json")
    assert "deep" in error_of(response)


HUGE_NAMES = [
    ("/api/join-tokens/", {"name": "x" * 101}),
    ("/api/api-keys/", {"name": "x" * 101}),
    ("/api/models/", {"name": "m" * 101}),
    ("/api/deployments/", {"name": "d" * 101, "model": "mlp", "version": 1}),
    ("/api/join-tokens/", {"name": "a\x00b"}),
    ("/api/models/", {"name": "a\x00b"}),
    ("/api/models/", {"name": "m3", "description": "d" * 10_001}),
]


def test_huge_or_nul_strings_in_names_are_refused(operator_api, deployment):
    for endpoint, body in HUGE_NAMES:
        response = operator_api.post(endpoint, body, format="json")
        assert response.status_code == 400, (endpoint, response.content[:200])
        assert set(response.json()["fields"]) <= {"name", "description"}


# --- revisions -----------------------------------------------------------------------------

def test_a_change_that_changes_nothing_records_no_revision(operator_api, deployment):
    before = list(DeploymentRevision.objects.values_list("number", flat=True))
    for body in ({}, {"replicas": deployment.replicas}):
        response = operator_api.patch("/api/deployments/mlp/", body, format="json")
        assert response.status_code == 200, response.content
        assert response.json()["replicas"] == deployment.replicas
    assert list(DeploymentRevision.objects.values_list("number", flat=True)) == before
    assert not DeploymentRevision.objects.filter(reason__in=["changed: ", "changed:"]).exists()


def test_a_real_change_records_one_revision_naming_it(operator_api, deployment):
    response = operator_api.patch("/api/deployments/mlp/", {"max_batch_size": 4}, format="json")
    assert response.status_code == 200
    latest = DeploymentRevision.objects.order_by("-number").first()
    assert latest.reason == "changed: max_batch_size"


def test_the_update_service_records_nothing_for_an_empty_change(deployment, operator):
    before = DeploymentRevision.objects.count()
    services.do_update_deployment(deployment, {}, operator, reason="changed: ")
    services.do_update_deployment(deployment, {"replicas": deployment.replicas}, operator)
    assert DeploymentRevision.objects.count() == before


def test_the_api_module_imports_first_in_a_fresh_process():
    """The Celery worker imports swarm_portal.api before DRF's views: no import cycle."""
    code = ("import django; django.setup(); import swarm_portal.api; "
            "from rest_framework.views import APIView; print(APIView.parser_classes[0].__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, env={**os.environ,
                                             "DJANGO_SETTINGS_MODULE": "tests.settings"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "BoundedJSONParser"
