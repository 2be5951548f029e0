"""Shared fixtures: personas (operator, viewer, anonymous), API clients, model files."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from knox.models import AuthToken
from rest_framework.test import APIClient

from registry.storage import ArtifactStore
from tests import factories


@pytest.fixture(autouse=True)
def artifact_root(settings, tmp_path: Path) -> Path:
    """Give every test its own empty artifact store."""
    root = tmp_path / "artifacts"
    root.mkdir()
    settings.ARTIFACT_ROOT = root
    return root


@pytest.fixture
def store(artifact_root: Path) -> ArtifactStore:
    return ArtifactStore(artifact_root)


@pytest.fixture
def operator(db):
    return factories.make_user("olga", operator=True)


@pytest.fixture
def viewer(db):
    return factories.make_user("victor")


@pytest.fixture
def admin_user(db):
    return factories.make_user("ada", staff=True)


def token_client(user) -> APIClient:
    _instance, token = AuthToken.objects.create(user=user, expiry=None)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return client


@pytest.fixture
def operator_api(operator) -> APIClient:
    return token_client(operator)


@pytest.fixture
def viewer_api(viewer) -> APIClient:
    return token_client(viewer)


@pytest.fixture
def model(operator):
    return factories.make_model(operator)


@pytest.fixture(scope="session")
def model_files(tmp_path_factory) -> dict[str, Path]:
    """Real archives built once per run: two TorchScript MLPs and a torch.export program."""
    directory = tmp_path_factory.mktemp("model-files")
    return {
        "torchscript": factories.torchscript_file(directory, seed=0),
        "torchscript_b": factories.torchscript_file(directory, seed=1, name="model-b.pt"),
        "torch_export": factories.torch_export_file(directory, seed=2),
    }


def redis_available(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def redis_url() -> str:
    """The REDIS_URL to test against; skipped without one, except in CI where it fails."""
    url = os.environ.get("REDIS_URL", "")
    if url and redis_available(url):
        return url
    reason = (f"needs Redis: REDIS_URL={url!r} does not answer" if url
              else "needs Redis: REDIS_URL is not set")
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must provide every service)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
