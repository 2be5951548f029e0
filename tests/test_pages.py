"""Registry pages: list, detail (signature, metadata, history), upload form, rollback."""

from __future__ import annotations

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from registry.models import ModelVersion
from tests.factories import SIGNATURE, add_version, sha256_of

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def operator_client(client, operator):
    client.force_login(operator)
    return client


def form_data(path, **extra):
    return {"artifact": SimpleUploadedFile(path.name, path.read_bytes()),
            "signature": json.dumps(SIGNATURE), "metadata": "", "format": "", **extra}


def test_login_page_logs_in(client, operator):
    response = client.post("/login/", {"username": "olga", "password": "pw-olga"}, follow=True)
    assert response.redirect_chain[-1][0] == "/models/"
    assert b"Models" in response.content


def test_model_list_shows_models_and_versions(operator_client, model, operator, model_files):
    add_version(model, operator, model_files["torchscript"])
    response = operator_client.get("/models/")
    assert response.status_code == 200
    assert b'href="/models/mlp/"' in response.content
    assert b"New model" in response.content


def test_form_upload_of_torchscript_redirects_to_the_model(operator_client, model, model_files):
    path = model_files["torchscript"]
    response = operator_client.post(f"/models/{model.name}/upload/", form_data(path), follow=True)
    assert response.redirect_chain[-1][0] == f"/models/{model.name}/"
    assert sha256_of(path).encode() in response.content
    assert ModelVersion.objects.get().sha256 == sha256_of(path)


def test_form_upload_of_torch_export_with_progress_script(operator_client, model, model_files):
    page = operator_client.get(f"/models/{model.name}/upload/")
    assert b"js/upload.js" in page.content
    assert b'enctype="multipart/form-data"' in page.content
    path = model_files["torch_export"]
    response = operator_client.post(f"/models/{model.name}/upload/",
                                    form_data(path, metadata='{"k": 1}'),
                                    HTTP_ACCEPT="application/json")
    assert response.status_code == 201
    body = response.json()
    assert body["sha256"] == sha256_of(path)
    assert body["redirect"] == f"/models/{model.name}/"
    assert ModelVersion.objects.get().metadata == {"k": 1}


def test_form_upload_refusal_shows_the_error(operator_client, model, store):
    bad = {"artifact": SimpleUploadedFile("notes.txt", b"not a model"),
           "signature": json.dumps(SIGNATURE)}
    page = operator_client.post(f"/models/{model.name}/upload/", bad)
    assert page.status_code == 400
    assert b"not a TorchScript or torch.export archive" in page.content
    as_json = operator_client.post(f"/models/{model.name}/upload/",
                                   {"artifact": SimpleUploadedFile("n.txt", b"no"),
                                    "signature": json.dumps(SIGNATURE)},
                                   HTTP_ACCEPT="application/json")
    assert as_json.status_code == 400
    assert "not a TorchScript" in as_json.json()["error"]
    assert ModelVersion.objects.count() == 0
    assert store.stored_names() == set()
    assert store.staging_names() == set()


def test_detail_shows_signature_metadata_aliases_and_rollback(operator_client, model, operator,
                                                              model_files):
    add_version(model, operator, model_files["torchscript"])
    add_version(model, operator, model_files["torchscript_b"])
    for version in (1, 2):
        operator_client.post(f"/models/{model.name}/aliases/",
                             {"alias": "production", "version": version})
    page = operator_client.get(f"/models/{model.name}/").content.decode()
    assert "features" in page and "scores" in page and "FP32" in page
    assert "Roll back" in page
    response = operator_client.post(f"/models/{model.name}/aliases/production/rollback/",
                                    follow=True)
    assert b"production rolled back to version 1" in response.content
    assert model.aliases.get(name="production").version.number == 1
    assert response.content.count(b"rollback") >= 1


def test_viewer_sees_no_controls(client, viewer, model, operator, model_files):
    add_version(model, operator, model_files["torchscript"])
    client.force_login(viewer)
    detail = client.get(f"/models/{model.name}/").content
    assert b"Upload version" not in detail
    assert b"Roll back" not in detail
    assert b"New model" not in client.get("/models/").content


def test_operator_creates_a_model_from_the_page(operator_client):
    response = operator_client.post("/models/new/", {"name": "bert", "description": "nlp"},
                                    follow=True)
    assert response.redirect_chain[-1][0] == "/models/bert/"
    clash = operator_client.post("/models/new/", {"name": "bert", "description": ""})
    assert b"already exists" in clash.content


def test_the_upload_form_prefills_the_latest_versions_signature(operator_client, model,
                                                                model_files):
    empty = operator_client.get(f"/models/{model.name}/upload/").content.decode()
    assert "&quot;inputs&quot;" not in empty.split('name="signature"')[1].split("</textarea>")[0]
    operator_client.post(f"/models/{model.name}/upload/", form_data(model_files["torchscript"]))
    signature = ModelVersion.objects.get().signature
    page = operator_client.get(f"/models/{model.name}/upload/").content.decode()
    field = page.split('name="signature"')[1].split("</textarea>")[0]
    shown = field.split(">", 1)[1].replace("&quot;", '"').strip()
    assert json.loads(shown) == signature
