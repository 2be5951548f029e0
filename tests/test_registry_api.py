"""Registry REST API: uploads of both formats, versions, downloads."""

from __future__ import annotations

import json

import pytest

from registry.models import ModelVersion
from tests.factories import SIGNATURE, sha256_of

pytestmark = pytest.mark.django_db(transaction=True)


def upload(client, model_name: str, path, signature=SIGNATURE, **fields):
    with path.open("rb") as handle:
        data = {"artifact": handle, "signature": json.dumps(signature), **fields}
        return client.post(f"/api/models/{model_name}/versions/", data, format="multipart")


def test_operator_creates_a_model(operator_api):
    response = operator_api.post("/api/models/", {"name": "resnet", "description": "d"},
                                 format="json")
    assert response.status_code == 201, response.content
    assert response.json()["owner"] == "olga"
    again = operator_api.post("/api/models/", {"name": "resnet"}, format="json")
    assert again.status_code == 400
    assert again.json()["error"] == "name: model with this name already exists."


def test_upload_torchscript_answers_201_with_sha256(operator_api, model, model_files, store):
    path = model_files["torchscript"]
    response = upload(operator_api, model.name, path, metadata=json.dumps({"team": "vision"}))
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["sha256"] == sha256_of(path)
    assert body["number"] == 1
    assert body["format"] == "torchscript"
    assert body["platform"] == "pytorch_torchscript"
    assert body["size_bytes"] == path.stat().st_size
    assert body["metadata"] == {"team": "vision"}
    assert body["signature"] == SIGNATURE
    assert store.stored_names() == {f"sha256/{body['sha256'][:2]}/{body['sha256']}"}
    assert store.staging_names() == set()


def test_upload_torch_export_program(operator_api, model, model_files):
    path = model_files["torch_export"]
    response = upload(operator_api, model.name, path, format="torch_export")
    assert response.status_code == 201, response.content
    assert response.json()["format"] == "torch_export"
    assert response.json()["sha256"] == sha256_of(path)


def test_versions_are_numbered_from_one(operator_api, model, model_files):
    first = upload(operator_api, model.name, model_files["torchscript"])
    second = upload(operator_api, model.name, model_files["torchscript_b"])
    assert (first.json()["number"], second.json()["number"]) == (1, 2)
    listing = operator_api.get(f"/api/models/{model.name}/versions/").json()
    assert [v["number"] for v in listing["results"]] == [2, 1]
    detail = operator_api.get(f"/api/models/{model.name}/").json()
    assert detail["latest_version"] == 2


def test_same_artifact_twice_is_a_conflict(operator_api, model, model_files, store):
    assert upload(operator_api, model.name, model_files["torchscript"]).status_code == 201
    again = upload(operator_api, model.name, model_files["torchscript"])
    assert again.status_code == 409
    assert "already version 1" in again.json()["error"]
    assert ModelVersion.objects.count() == 1
    assert len(store.stored_names()) == 1
    assert store.staging_names() == set()


def test_upload_to_unknown_model_is_404(operator_api, model_files, store):
    response = upload(operator_api, "nope", model_files["torchscript"])
    assert response.status_code == 404
    assert "error" in response.json()
    assert store.staging_names() == set()


async def test_download_streams_the_artifact_with_its_sha256(async_client, operator, model,
                                                             model_files):
    from asgiref.sync import sync_to_async
    from knox.models import AuthToken

    from tests.factories import add_version

    path = model_files["torchscript"]
    version = await sync_to_async(add_version)(model, operator, path)
    _, token = await sync_to_async(AuthToken.objects.create)(user=operator, expiry=None)
    url = f"/api/models/{model.name}/versions/{version.number}/artifact"
    response = await async_client.get(url, headers={"Authorization": f"Token {token}"})
    assert response.status_code == 200
    assert response["X-Artifact-SHA256"] == sha256_of(path)
    assert response["Content-Length"] == str(path.stat().st_size)
    body = b"".join([chunk async for chunk in response.streaming_content])
    assert body == path.read_bytes()
    anonymous = await async_client.get(url)
    assert anonymous.status_code == 401
    assert "error" in anonymous.json()
    missing = await async_client.get(url.replace("/1/", "/9/"),
                                     headers={"Authorization": f"Token {token}"})
    assert missing.status_code == 404
