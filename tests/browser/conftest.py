"""Browser tests: Debian's Chromium driven by Playwright against a real portal process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connections

from tests.conftest import free_port
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


@pytest.fixture
def screenshot(request: pytest.FixtureRequest) -> Any:
    """Save a page's screenshot as var/test-artifacts/<test>-<step>.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def save(page: Any, step: str) -> Path:
        path = ARTIFACTS / f"{request.node.name}-{step}.png"
        page.screenshot(path=str(path), full_page=True)
        return path
    return save
