"""A join token's or API key's status is true wherever it is shown: API and access page."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from serving import services
from serving.models import ApiKey, JoinToken

pytestmark = pytest.mark.django_db(transaction=True)


def make_join_token(operator, **fields) -> JoinToken:
    token, _secret = services.do_create_join_token(name="make run: local workers", user=operator,
                                                   expires_in=timedelta(minutes=10), uses=1)
    JoinToken.objects.filter(pk=token.pk).update(**fields)
    token.refresh_from_db()
    return token


@pytest.mark.parametrize(("fields", "status"), [
    ({}, "valid"),
    ({"uses_left": 0}, "used up"),
    ({"expires_at": timezone.now() - timedelta(seconds=1)}, "expired"),
    ({"uses_left": 0, "expires_at": timezone.now() - timedelta(seconds=1)}, "expired"),
    ({"revoked_at": timezone.now(), "uses_left": 0}, "revoked"),
])
def test_a_join_tokens_status_is_shown_truly_in_the_api_and_the_access_page(
        operator, operator_api, fields, status):
    token = make_join_token(operator, **fields)
    assert token.status == status
    listed = operator_api.get(f"/api/join-tokens/{token.pk}/").json()
    assert listed["status"] == status
    page = APIClient()
    page.force_login(operator)
    html = page.get("/access/").content.decode()
    row = html.split('id="join-tokens"')[1].split("</table>")[0]
    shown = f'<span class="state {status.replace(" ", "-")}">{status}</span>'
    assert shown in row
    if status != "valid":
        assert '<span class="state valid">valid</span>' not in row


@pytest.mark.parametrize(("fields", "status"), [
    ({}, "valid"),
    ({"expires_at": timezone.now() - timedelta(seconds=1)}, "expired"),
    ({"revoked_at": timezone.now()}, "revoked"),
])
def test_an_api_keys_status_is_shown_truly(operator, operator_api, fields, status):
    key, _secret = services.do_create_api_key(name="k", user=operator, deployments=None,
                                              expires_in=None, rate_limit_rps=None)
    ApiKey.objects.filter(pk=key.pk).update(**fields)
    key.refresh_from_db()
    assert key.status == status
    assert operator_api.get(f"/api/api-keys/{key.pk}/").json()["status"] == status


def test_a_token_whose_last_use_a_node_took_reads_used_up(operator_api):
    from tests.test_serving_api import create_token, join

    join(create_token(operator_api, uses=1))
    listed = operator_api.get("/api/join-tokens/").json()["results"]
    assert [(token["uses_left"], token["status"]) for token in listed] == [(0, "used up")]
