"""An API key's limit in tokens per minute: set through the REST API, the access page and the
service, validated everywhere, documented in the schema, and exported in the gateway's table."""

from __future__ import annotations

import pytest
from django.test import Client

from serving import services
from serving.gateway.routes import RouteTable
from serving.gateway_api import issue_gateway_token
from serving.models import MAX_TOKENS_PER_MINUTE, ApiKey
from swarm_portal.errors import ServiceError

pytestmark = pytest.mark.django_db
KEYS = "/api/api-keys/"


def test_a_key_created_with_a_token_limit_shows_it_in_the_api(operator_api):
    created = operator_api.post(KEYS, {"name": "chat", "rate_limit_tokens_per_minute": 5000},
                                format="json")
    assert created.status_code == 201, created.content
    assert created.json()["rate_limit_tokens_per_minute"] == 5000
    assert ApiKey.objects.get(pk=created.json()["id"]).rate_limit_tokens_per_minute == 5000
    listed = operator_api.get(KEYS).json()["results"]
    assert [k["rate_limit_tokens_per_minute"] for k in listed] == [5000]


def test_a_key_created_without_a_token_limit_has_none(operator_api):
    created = operator_api.post(KEYS, {"name": "plain"}, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["rate_limit_tokens_per_minute"] is None


@pytest.mark.parametrize("value", [0, -1, MAX_TOKENS_PER_MINUTE + 1, 10**30, 1.5, "lots",
                                   True, [60], None])
def test_a_token_limit_that_is_not_a_positive_integer_up_to_1e9_is_a_400(operator_api, value):
    refused = operator_api.post(KEYS, {"name": "k", "rate_limit_tokens_per_minute": value},
                                format="json")
    assert refused.status_code == 400, refused.content
    assert refused["Content-Type"] == "application/json"
    assert "rate_limit_tokens_per_minute" in refused.content.decode()
    assert not ApiKey.objects.exists()


def test_the_largest_token_limit_is_accepted(operator_api):
    created = operator_api.post(
        KEYS, {"name": "big", "rate_limit_tokens_per_minute": MAX_TOKENS_PER_MINUTE},
        format="json")
    assert created.status_code == 201, created.content


def test_the_schema_documents_the_token_limit(operator_api):
    schema = operator_api.get("/api/schema/", {"format": "json"}).json()["components"]["schemas"]
    asked = schema["ApiKeyCreateRequest"]["properties"]["rate_limit_tokens_per_minute"]
    assert (asked["type"], asked["minimum"], asked["maximum"]) == (
        "integer", 1, MAX_TOKENS_PER_MINUTE)
    answered = schema["ApiKey"]["properties"]["rate_limit_tokens_per_minute"]
    assert answered["type"] == "integer" and answered["nullable"] is True
    assert answered["readOnly"] is True


@pytest.mark.parametrize("value", [0, MAX_TOKENS_PER_MINUTE + 1])
def test_the_service_refuses_a_token_limit_out_of_range(operator, value):
    with pytest.raises(ServiceError, match="tokens per minute"):
        services.do_create_api_key(name="k", user=operator, deployments=None,
                                   expires_in=None, rate_limit_rps=None,
                                   tokens_per_minute=value)
    assert not ApiKey.objects.exists()


def test_the_gateways_table_carries_each_keys_token_limit(operator):
    limited, _ = services.do_create_api_key(name="limited", user=operator, deployments=None,
                                            expires_in=None, rate_limit_rps=None,
                                            tokens_per_minute=1200)
    free, _ = services.do_create_api_key(name="free", user=operator, deployments=None,
                                         expires_in=None, rate_limit_rps=2.0)
    _token, secret = issue_gateway_token("edge-tokens")
    answer = Client(headers={"Authorization": f"Bearer {secret}"}).get("/api/gateway/table")
    assert answer.status_code == 200, answer.content
    raw_keys = answer.json()["api_keys"]
    assert raw_keys[limited.key_hash]["tokens_per_minute"] == 1200
    assert raw_keys[free.key_hash]["tokens_per_minute"] is None
    parsed = RouteTable.from_dict(answer.json()).api_keys
    assert parsed[limited.key_hash].tokens_per_minute == 1200
    assert parsed[free.key_hash].tokens_per_minute is None


# the access page


def page(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_the_access_page_creates_a_key_with_a_token_limit_and_shows_it(operator):
    client = page(operator)
    form = client.get("/access/").content.decode()
    assert 'name="tokens_per_minute"' in form
    created = client.post("/access/keys/", {"name": "chat", "tokens_per_minute": "3000",
                                            "burst": "0"})
    assert created.status_code == 200
    assert ApiKey.objects.get(name="chat").rate_limit_tokens_per_minute == 3000
    row = client.get("/access/").content.decode().split('id="api-keys"')[1]
    assert "3000 tokens/min" in row.split("</table>")[0]


def test_the_access_page_shows_both_limits_or_none(operator):
    services.do_create_api_key(name="both", user=operator, deployments=None, expires_in=None,
                               rate_limit_rps=5.0, burst=2, tokens_per_minute=700)
    services.do_create_api_key(name="open", user=operator, deployments=None, expires_in=None,
                               rate_limit_rps=None)
    table = page(operator).get("/access/").content.decode().split('id="api-keys"')[1]
    rows = {row.split("<td>", 2)[1].split("</td>")[0]: row
            for row in table.split("</table>")[0].split("<tr>")[2:]}
    assert "5.0/s (burst 2)" in rows["both"] and "700 tokens/min" in rows["both"]
    assert "tokens/min" not in rows["open"] and "<td>none</td>" in rows["open"]


@pytest.mark.parametrize("value", ["0", "-3", str(MAX_TOKENS_PER_MINUTE + 1), "1.5", "many"])
def test_the_access_page_refuses_a_bad_token_limit_and_creates_nothing(operator, value):
    client = page(operator)
    refused = client.post("/access/keys/", {"name": "chat", "tokens_per_minute": value},
                          follow=True)
    assert refused.status_code == 200
    assert "tokens_per_minute" in refused.content.decode()
    assert not ApiKey.objects.exists()


def test_a_viewer_cannot_create_a_key_with_a_token_limit(viewer):
    refused = page(viewer).post("/access/keys/", {"name": "chat", "tokens_per_minute": "10"})
    assert refused.status_code == 403
    assert not ApiKey.objects.exists()
