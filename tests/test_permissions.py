"""Anonymous users get only login and health; viewers read; operators write."""

from __future__ import annotations

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from registry.models import ModelVersion
from tests.factories import SIGNATURE, add_version

pytestmark = pytest.mark.django_db(transaction=True)


def test_anonymous_gets_only_login_and_health(client, model):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/login/").status_code == 200
    for page in ("/models/", f"/models/{model.name}/", f"/models/{model.name}/upload/", "/"):
        response = client.get(page, follow=True)
        assert response.redirect_chain, page
        assert response.redirect_chain[-1][0].startswith("/login/"), page
    api = APIClient()
    for url in ("/api/models/", f"/api/models/{model.name}/versions/", "/api/schema/?format=json"):
        response = api.get(url)
        assert response.status_code == 401, url
        assert "error" in response.json()


def test_a_bad_token_is_refused(model):
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION="Token swp_not-a-real-token")
    response = api.get("/api/models/")
    assert response.status_code == 401
    assert response.json() == {"error": "Invalid token."}


def test_viewer_reads_but_cannot_write(viewer_api, client, viewer, model, operator, model_files):
    add_version(model, operator, model_files["torchscript"])
    assert viewer_api.get("/api/models/").status_code == 200
    assert viewer_api.get(f"/api/models/{model.name}/versions/1/").status_code == 200
    upload = viewer_api.post(
        f"/api/models/{model.name}/versions/",
        {"artifact": SimpleUploadedFile("m.pt", model_files["torchscript_b"].read_bytes()),
         "signature": json.dumps(SIGNATURE)}, format="multipart")
    assert upload.status_code == 403
    assert "operator and admin roles" in upload.json()["error"]
    move = viewer_api.put(f"/api/models/{model.name}/aliases/production/", {"version": 1},
                          format="json")
    assert move.status_code == 403
    create = viewer_api.post("/api/models/", {"name": "other"}, format="json")
    assert create.status_code == 403
    assert ModelVersion.objects.count() == 1
    client.force_login(viewer)
    assert client.get(f"/models/{model.name}/").status_code == 200
    assert client.get(f"/models/{model.name}/upload/").status_code == 403
    assert client.post(f"/models/{model.name}/aliases/", {"alias": "p", "version": 1}
                       ).status_code == 403


def test_staff_without_the_group_may_write(admin_user, model, model_files):
    from tests.conftest import token_client

    api = token_client(admin_user)
    response = api.post(
        f"/api/models/{model.name}/versions/",
        {"artifact": SimpleUploadedFile("m.pt", model_files["torchscript"].read_bytes()),
         "signature": json.dumps(SIGNATURE)}, format="multipart")
    assert response.status_code == 201, response.content


def test_session_auth_works_for_the_api(client, viewer, model):
    client.force_login(viewer)
    assert client.get("/api/models/").status_code == 200
