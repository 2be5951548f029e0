"""Aliases: moves, the audit history, rollback as one action."""

from __future__ import annotations

import pytest

from registry.models import AliasMove
from tests.factories import add_version

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def two_versions(model, operator, model_files):
    return (add_version(model, operator, model_files["torchscript"]),
            add_version(model, operator, model_files["torchscript_b"]))


def point(client, model, alias: str, version: int):
    return client.put(f"/api/models/{model.name}/aliases/{alias}/", {"version": version},
                      format="json")


def test_moving_an_alias_records_who_when_from_and_to(operator_api, model, two_versions):
    assert point(operator_api, model, "production", 1).json()["version"] == 1
    moved = point(operator_api, model, "production", 2)
    assert moved.status_code == 200
    assert moved.json()["version"] == 2
    history = operator_api.get(f"/api/models/{model.name}/aliases/production/history/").json()
    rows = [(m["from_version"], m["to_version"], m["moved_by"]) for m in history["results"]]
    assert rows == [(1, 2, "olga"), (None, 1, "olga")]
    assert all(m["moved_at"] for m in history["results"])


def test_rollback_moves_the_alias_back_in_one_call(operator_api, model, two_versions):
    point(operator_api, model, "production", 1)
    point(operator_api, model, "production", 2)
    response = operator_api.post(f"/api/models/{model.name}/aliases/production/rollback/")
    assert response.status_code == 200, response.content
    assert response.json()["version"] == 1
    last = AliasMove.objects.first()
    assert (last.from_version.number, last.to_version.number, last.is_rollback) == (2, 1, True)
    listing = operator_api.get(f"/api/models/{model.name}/aliases/").json()
    assert listing == [{"name": "production", "version": 1,
                        "updated_at": listing[0]["updated_at"]}]


def test_rollback_without_an_earlier_version_is_refused(operator_api, model, two_versions):
    point(operator_api, model, "staging", 1)
    response = operator_api.post(f"/api/models/{model.name}/aliases/staging/rollback/")
    assert response.status_code == 400
    assert "no earlier version" in response.json()["error"]
    unknown = operator_api.post(f"/api/models/{model.name}/aliases/nope/rollback/")
    assert unknown.status_code == 404


def test_alias_to_a_missing_version_or_bad_name_is_refused(operator_api, model, two_versions):
    missing = point(operator_api, model, "production", 7)
    assert missing.status_code == 404
    assert "no version 7" in missing.json()["error"]
    bad = operator_api.put(f"/api/models/{model.name}/aliases/production/", {"version": "x"},
                           format="json")
    assert bad.status_code == 400
    assert bad.json()["error"].startswith("version:")
    assert AliasMove.objects.count() == 0


def test_model_wide_alias_history_and_delete(operator_api, model, two_versions):
    point(operator_api, model, "production", 1)
    point(operator_api, model, "canary", 2)
    assert operator_api.delete(f"/api/models/{model.name}/aliases/canary/").status_code == 204
    history = operator_api.get(f"/api/models/{model.name}/alias-history/").json()["results"]
    assert [(m["alias"], m["from_version"], m["to_version"]) for m in history] == [
        ("canary", 2, None), ("canary", None, 2), ("production", None, 1)]
    assert operator_api.get(f"/api/models/{model.name}/").json()["aliases"] == {"production": 1}
