"""make run's demo commands: tiny-lm registered (hf_causal_lm) and deployed beside the other
demo models, each once however often the commands run; the Playground offers it a chat and
its download is a .tar."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from unittest import mock

import pytest
from django.core.management import call_command
from django.test import Client, override_settings

from registry.demo_lm import BUILD_VERSION, DEMO_LM_NAME
from registry.models import Model, ModelVersion
from serving.models import Deployment
from swarm_protocol.archive_hf import TEXT_SIGNATURE
from tests.factories import make_user

pytestmark = pytest.mark.django_db


@dataclass(frozen=True)
class DemoRuns:
    """What two runs of each demo command left, copied out of the test database."""

    second_register: str
    second_deploy: str
    versions: dict[str, int]
    deployments: dict[str, int]
    tiny_lm_format: str
    tiny_lm_signature: dict[str, object]
    tiny_lm_metadata: dict[str, object]
    aliases: dict[str, int]
    download_name: str
    playground_kinds: dict[str, str]
    cached_archives: list[str]


def read_json_script(page: str, element_id: str) -> dict[str, str]:
    start = page.split(f'<script id="{element_id}" type="application/json">')[1]
    return dict(json.loads(start.split("</script>")[0]))


@pytest.fixture(scope="module")
def runs(django_db_setup, django_db_blocker, tmp_path_factory) -> DemoRuns:
    directory = tmp_path_factory.mktemp("demo-commands")
    cache = directory / "cache"
    with (django_db_blocker.unblock(), override_settings(ARTIFACT_ROOT=directory / "store"),
          mock.patch.dict(os.environ, {"SWARM_DEMO_CACHE": str(cache)})):
        (directory / "store").mkdir()
        try:
            owner = make_user("ada", staff=True)
            second_register, second_deploy = io.StringIO(), io.StringIO()
            call_command("register_demo_model", owner=owner.username, stdout=io.StringIO())
            call_command("ensure_demo_deployment", owner=owner.username, stdout=io.StringIO())
            call_command("register_demo_model", owner=owner.username, stdout=second_register)
            call_command("ensure_demo_deployment", owner=owner.username, stdout=second_deploy)
            version = ModelVersion.objects.get(model__name=DEMO_LM_NAME)
            browser = Client()
            browser.force_login(owner)
            download = browser.get(
                f"/api/models/{DEMO_LM_NAME}/versions/{version.number}/artifact")
            page = browser.get("/playground/").content.decode()
            return DemoRuns(
                second_register=second_register.getvalue(),
                second_deploy=second_deploy.getvalue(),
                versions={m.name: m.versions.count() for m in Model.objects.all()},
                deployments=dict(Deployment.objects.values_list("name", "replicas")),
                tiny_lm_format=version.format, tiny_lm_signature=version.signature,
                tiny_lm_metadata=version.metadata,
                aliases={m.name: m.aliases.count() for m in Model.objects.all()},
                download_name=download["Content-Disposition"],
                playground_kinds=read_json_script(page, "pg-kinds"),
                cached_archives=sorted(path.name for path in cache.iterdir()))
        finally:
            call_command("flush", interactive=False, verbosity=0)


def test_tiny_lm_is_registered_as_a_text_generation_model(runs):
    assert runs.tiny_lm_format == "hf_causal_lm"
    assert runs.tiny_lm_signature == TEXT_SIGNATURE
    assert runs.tiny_lm_metadata["source"] == "registry.demo_lm"
    # Built once, into the cache folder the environment names.
    assert runs.cached_archives == [f"{DEMO_LM_NAME}-v{BUILD_VERSION}.tar"]


def test_the_demo_commands_are_idempotent(runs):
    assert runs.versions == {"demo-digits": 1, "demo-mlp": 1, DEMO_LM_NAME: 1}
    assert runs.aliases == {"demo-digits": 1, "demo-mlp": 1, DEMO_LM_NAME: 1}
    assert runs.deployments == {"demo-mlp": 2, "demo-digits": 1, DEMO_LM_NAME: 1}
    assert f"demo model {DEMO_LM_NAME!r} is registered" in runs.second_register
    assert f"deployment {DEMO_LM_NAME!r} exists" in runs.second_deploy
    assert "registered " not in runs.second_register.replace("is registered", "")
    assert "deployed " not in runs.second_deploy


def test_the_tiny_lm_downloads_as_a_tar(runs):
    assert runs.download_name == f'attachment; filename="{DEMO_LM_NAME}-v1.tar"'


def test_the_playground_offers_a_chat_for_the_tiny_lm_only(runs):
    assert runs.playground_kinds == {"demo-digits": "tensor", "demo-mlp": "tensor",
                                     DEMO_LM_NAME: "chat"}
