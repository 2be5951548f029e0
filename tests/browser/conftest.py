"""Browser tests: Debian's Chromium driven by Playwright against a real portal process.

Shared here: `browser`, `portal`, `log_in` (a page signed in as a fixture's user),
`screenshot` (full-page PNGs under $SWARM_TEST_ARTEFACTS, else var/test-artifacts/<module>)
and `send_heartbeat` (a node's heartbeat over real HTTP).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connections

from serving.agent.client import PortalClient
from swarm_protocol.agent_messages import HeartbeatRequest, ReplicaStatus
from tests.conftest import free_port
from tests.dashboards_helpers import gpu
from tests.live import ROOT, LivePortal

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "var" / "test-artifacts"  # gitignored: screenshots are never committed


@pytest.fixture
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        reason = f"needs Debian's Chromium at {CHROMIUM} (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must provide it)")
        pytest.skip(reason)
    sync_api = pytest.importorskip("playwright.sync_api")
    # Playwright's sync API runs an event loop in this thread; the ORM calls the tests
    # make between browser steps are plain synchronous calls all the same.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_api.sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                                  args=CHROMIUM_ARGS)
            yield chromium
            chromium.close()
            # While Playwright's loop is set, the ORM opens a connection of its own: close
            # it here, in that same state, or the test database cannot be dropped.
            connections.close_all()
    finally:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


@pytest.fixture
def portal(artifact_root: Path) -> Iterator[LivePortal]:
    """The portal under uvicorn on the test database (and REDIS_URL when set)."""
    server = LivePortal(free_port(), artifact_root, gateway=True).start()
    yield server
    server.stop()


def portal_password(username: str) -> str:
    """Give the user a password the portal's hashers can check (tests hash with MD5)."""
    from django.contrib.auth.hashers import PBKDF2PasswordHasher
    from django.contrib.auth.models import User

    password = f"pw-{username}"
    hashed = PBKDF2PasswordHasher().encode(password, "browsersalt", iterations=1000)
    User.objects.filter(username=username).update(password=hashed)
    return password


@pytest.fixture
def log_in(browser: Any, portal: LivePortal) -> Callable[..., Any]:
    """Return `log_in(username, viewport=None)`: a new page signed in through the form.

    `viewport` is Playwright's {"width": px, "height": px} (its default desktop size if None).
    """
    def sign_in(username: str, viewport: dict[str, int] | None = None) -> Any:
        password = portal_password(username)
        options: dict[str, Any] = {"base_url": portal.url}
        if viewport is not None:
            options["viewport"] = viewport
        page = browser.new_context(**options).new_page()
        page.goto("/login/")
        page.fill("input[name=username]", username)
        page.fill("input[name=password]", password)
        page.click("main button[type=submit]")
        page.wait_for_url("**/models/")
        return page
    return sign_in


@pytest.fixture
def screenshot(request: pytest.FixtureRequest) -> Callable[[Any, str], Path]:
    """Return `screenshot(page, step)`: save the full page as <folder>/<test>-<step>.png.

    The folder is $SWARM_TEST_ARTEFACTS, else var/test-artifacts/<module> (test_why_browser
    -> why); it is printed, for CI to keep.
    """
    module = request.module.__name__.rpartition(".")[2]
    default = ARTIFACTS / module.removeprefix("test_").removesuffix("_browser")
    folder = Path(os.environ.get("SWARM_TEST_ARTEFACTS") or default)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"screenshots: {folder}")

    def save(page: Any, step: str) -> Path:
        path = folder / f"{request.node.name}-{step}.png"
        page.screenshot(path=str(path), full_page=True)
        return path
    return save


@pytest.fixture
def send_heartbeat(portal: LivePortal) -> Callable[[Any, float, list[ReplicaStatus]], None]:
    """Return `send_heartbeat(node, util_pct, replicas)`: one GPU at util_pct, over HTTP."""
    def send(node: Any, util_pct: float, replicas: list[ReplicaStatus]) -> None:
        client = PortalClient(portal.url, node_secret=node.secret)
        try:
            client.heartbeat(HeartbeatRequest(devices=[gpu(util=util_pct)], replicas=replicas))
        finally:
            client.close()
    return send
