"""Property: whatever a gateway (or anyone holding its token) sends to /api/gateway/, the
answer is never a 5xx and every refusal is JSON. Bodies are valid ones with a field
replaced by arbitrary JSON or dropped, arbitrary JSON, or raw bytes. Bounded: a few hundred
requests.
"""

from __future__ import annotations

import json

import pytest
from django.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.gateway_api import issue_gateway_token
from tests.test_fuzz_agent_api import json_values, mutated

pytestmark = pytest.mark.django_db
VALID = {"sessions": {"session_key": "abcdefgh12345678"},
         "activations": {"deployment_id": 7, "held": 1},
         "successes": {"replicas": {"1": 1700000000.0}}}
odd_text = st.sampled_from(["\ud800", "\ud800" * 12, "a\x00b" * 4, "²", "é" * 10, "x" * 300,
                            "-1", "0", "1e3"])
successes = mutated(VALID["successes"], {"replicas": st.dictionaries(
    st.text(max_size=6) | odd_text, json_values, max_size=3)})
bodies = st.one_of(
    st.tuples(st.sampled_from(sorted(VALID)), json_values.map(json.dumps)),
    st.tuples(st.just("sessions"), mutated(VALID["sessions"], {
        "session_key": st.text(max_size=40) | odd_text}).map(json.dumps)),
    st.tuples(st.just("activations"), mutated(VALID["activations"]).map(json.dumps)),
    st.tuples(st.just("successes"), successes.map(json.dumps)),
    st.tuples(st.sampled_from(sorted(VALID)), st.binary(max_size=40)))
# A query string is bytes on the wire: no lone surrogates (the test client cannot send one).
query_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=70)
queries = st.dictionaries(st.sampled_from(["instance", "other", "é"]),
                          query_text | odd_text.filter(lambda t: "\ud800" not in t), max_size=2)


@pytest.fixture
def gateway() -> Client:
    """A client with a valid token, made once for all of a test's examples."""
    return Client(headers={"Authorization": f"Bearer {issue_gateway_token('fuzz')[1]}"})


def assert_answered(response) -> None:
    assert response.status_code < 500, response.content
    if response.status_code >= 400:
        assert response["Content-Type"] == "application/json"


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies)
def test_no_body_gets_a_server_error(gateway, body):
    what, content = body
    assert_answered(gateway.post(f"/api/gateway/{what}", content,
                                content_type="application/json"))


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=queries)
def test_no_table_query_gets_a_server_error(gateway, query):
    assert_answered(gateway.get("/api/gateway/table", query))
