"""Shared fixtures: personas (operator, viewer, anonymous), API clients, model files."""

from __future__ import annotations

import os
import socket
import time
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


@pytest.fixture
def join_secret(operator) -> str:
    """A join token's secret (unlimited uses), for registering test nodes."""
    from serving import services

    _token, secret = services.do_create_join_token(name="test", user=operator,
                                                   expires_in=None, uses=None)
    return secret


@pytest.fixture
def gpu_node(join_secret):
    """A registered node with one 80 GiB GPU (no agent: tests send its heartbeats)."""
    from tests.dashboards_helpers import register_node

    return register_node(join_secret, "gpu-a")


@pytest.fixture
def served_deployment(gpu_node, model, operator, model_files):
    """The `mlp` deployment of version 1, one replica placed on gpu_node."""
    from serving import services

    add_version = factories.add_version
    version = add_version(model, operator, model_files["torchscript"])
    return services.do_create_deployment(name="mlp", model=model, version_number=version.number,
                                         alias_name="", user=operator, replicas=1,
                                         memory_bytes=1024**3)


LEFTOVER_GRACE_S = 20.0  # a worker may still be draining when the last test ends


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind(request, tmp_path_factory):
    """Fail the run loudly if its tests left detached processes running (and end them).

    Every process a test starts carries the test's tmp_path on its command line or in its
    environment (SWARM_VAR_DIR, ARTIFACT_ROOT, --cache-dir), under this session's base.
    One that still descends from this process has an owner that will stop it (a session
    fleet stopped at config cleanup); one that does not was orphaned: a leak. Whatever
    is still running after every cleanup is killed.
    """
    from tests.process_tree import cmdline, descendants, kill_all, live_processes_mentioning

    # With the separator: pytest-14 must not match another run's pytest-144.
    base = f"{tmp_path_factory.getbasetemp()}{os.sep}"

    def leftovers(*, orphans_only: bool) -> list[int]:
        owned = descendants(os.getpid()) if orphans_only else set()
        return [pid for pid in live_processes_mentioning(base, environment=True)
                if pid not in owned]

    # Registered first, so it runs after every later cleanup (they run last-in first-out).
    request.config.add_cleanup(lambda: kill_all(leftovers(orphans_only=False)))
    yield
    deadline_s = time.monotonic() + LEFTOVER_GRACE_S
    while (left := leftovers(orphans_only=True)) and time.monotonic() < deadline_s:
        time.sleep(0.5)
    if left:
        described = "\n".join(f"  {pid}: {cmdline(pid)[:200]}" for pid in left)
        kill_all(left)
        pytest.fail(f"tests left {len(left)} processes running (now killed):\n{described}")
