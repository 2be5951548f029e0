"""Property: whatever an agent (or anyone) sends to the agent API, the answer is never a
5xx and always JSON. Hypothesis draws bodies that are valid messages with any field
replaced by arbitrary JSON (or dropped), arbitrary JSON, raw bytes, odd content types and
odd credentials. Bounded: a couple of hundred requests, a few seconds on a quiet machine.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.django_db(transaction=True)

DEVICE = {"index": 0, "kind": "cpu", "name": "Test CPU", "uuid": "cpu-0",
          "memory_total_bytes": 16 * 1024**3, "memory_used_bytes": 1024**3,
          "utilization_pct": 5.0}
REPLICA = {"replica_id": 1, "state": "ready", "port": 9100, "error": "", "in_flight": 0,
           "mean_in_flight": 0.5}

json_leaves = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**70,
                                                                         max_value=2**70)
               | st.floats() | st.text(max_size=20)
               | st.sampled_from(["\ud800", "a\x00b", "swn_\u00b2_x", "x" * 300]))
json_values = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)


def mostly(usual: Any, other: Any, odds: int = 8) -> Any:
    """Draw from `usual` `odds` times in `odds + 1`, else from `other`."""
    return st.integers(0, odds).flatmap(lambda k: other if k == 0 else usual)


def mutated(valid: dict[str, Any], overrides: dict[str, Any] | None = None) -> Any:
    """Return a strategy for `valid` with any of its fields replaced or dropped."""
    overrides = overrides or {}
    fields = {name: overrides.get(name, st.just(value)) for name, value in valid.items()}
    # Mostly one field wrong at a time, so that the others' checks are reached too.
    return st.fixed_dictionaries({
        name: mostly(strategy, json_values, odds=12) for name, strategy in fields.items()
    }).flatmap(lambda body: mostly(st.just(set()),
                                   st.sets(st.sampled_from(sorted(body)), max_size=2), 3).map(
        lambda dropped: {k: v for k, v in body.items() if k not in dropped}))


devices = st.lists(mutated(DEVICE), max_size=2)
heartbeats = mutated({"devices": [DEVICE], "replicas": [REPLICA], "cached_artifacts": ["a"]},
                     {"devices": devices, "replicas": st.lists(mutated(REPLICA), max_size=2)})
registrations = mutated({"join_token": "JOIN", "name": "n", "address": "127.0.0.1",
                         "cost_per_hour": 1.0, "devices": [DEVICE], "labels": {"z": "a"},
                         "agent_version": "1"}, {"devices": devices})
raw_bodies = st.one_of(json_values.map(lambda v: json.dumps(v).encode()),
                       st.binary(max_size=40))
mostly_json = mostly(st.just("application/json"), st.sampled_from([
    "application/json; charset=utf-8", "text/plain", "", "application/x-www-form-urlencoded"]),
    odds=5)
latin1_text = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=60)
# Mostly the node's real secret (so bodies reach validation), else anything.
credentials = mostly(st.just("Bearer VALID"), st.one_of(
    latin1_text.map("Bearer ".__add__), latin1_text,
    st.sampled_from(["Bearer swn_\u00b2_x", "Bearer swn_" + "9" * 5000 + "_x", "Bearer VALIDx",
                     ""])), odds=3)
ENDPOINTS = {  # path: (its method, a strategy for its body)
    "/api/agent/register": ("POST", registrations),
    "/api/agent/heartbeat": ("POST", heartbeats),
    "/api/agent/deregister": ("POST", st.just({})),
    "/api/agent/artifacts/" + "a" * 64: ("GET", st.just(None)),
    "/api/agent/artifacts/x": ("GET", st.just(None)),
}


@st.composite
def requests(draw: Any) -> tuple[str, str, bytes, str, str]:
    """Return (method, path, body, content type, authorization) for one agent call."""
    path = draw(st.sampled_from(sorted(ENDPOINTS)))
    method, body_strategy = ENDPOINTS[path]
    method = draw(mostly(st.just(method), st.sampled_from(["GET", "PUT", "POST"]), 6))
    body = draw(mostly(body_strategy.map(lambda v: json.dumps(v).encode()), raw_bodies, 4))
    return method, path, body, draw(mostly_json), draw(credentials)


def send(client: Client, method: str, path: str, body: bytes, content_type: str,
         authorization: str) -> Any:
    headers = {"Authorization": authorization} if authorization else {}
    return client.generic(method, path, body, content_type=content_type, headers=headers)


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(call=requests())
def test_the_agent_api_never_answers_5xx_and_always_json(join_secret, gpu_node, call):
    method, path, body, content_type, authorization = call
    authorization = authorization.replace("VALID", gpu_node.secret)
    body = body.replace(b"JOIN", join_secret.encode())
    headers = {"Authorization": authorization} if authorization else {}
    response = Client(raise_request_exception=False).generic(
        method, path, body, content_type=content_type, headers=headers)
    event(f"{method} {path.rsplit('/', 1)[-1][:10]} -> {response.status_code}")
    assert response.status_code < 500, (response.status_code, response.content[:300])
    if response.status_code == 204:
        return  # deregistered: no body
    assert response["Content-Type"] == "application/json", response.content[:300]
    payload = response.json()
    assert isinstance(payload, dict)
    if response.status_code >= 400:
        assert isinstance(payload["error"], str) and payload["error"]


def test_the_fuzz_reaches_a_successful_heartbeat(gpu_node):
    """The generator's valid core is really valid (else the property would test little)."""
    body = json.dumps({"devices": [DEVICE], "replicas": [REPLICA], "cached_artifacts": ["a"]})
    response = Client().post("/api/agent/heartbeat", body, content_type="application/json",
                             headers={"Authorization": f"Bearer {gpu_node.secret}"})
    assert response.status_code == 200, response.content
