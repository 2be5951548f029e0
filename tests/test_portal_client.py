"""PortalClient, the standalone gateway's side of /api/gateway/: failures and the saved table.

A portal that is down is a real closed port; the unix-socket test runs the real portal
under uvicorn on a socket file, as `make run` does behind the gateway.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from serving.gateway.filesource import write_table
from serving.gateway.portal_source import PortalClient, PortalError, PortalRefused
from tests.gateway_helpers import deployment, replica_route, table
from tests.replica_models import REPO_ROOT, free_port
from tests.waiting import wait_until


def down_portal(tmp_path: Path, **options) -> PortalClient:
    """Return a client of a portal that refuses connections."""
    return PortalClient(f"http://127.0.0.1:{free_port()}", "swg_token",
                        table_cache_path=tmp_path / "table.json", **options)


def test_a_client_of_a_portal_that_is_down_fails_closed(tmp_path):
    async def scenario() -> None:
        client = down_portal(tmp_path)
        try:
            assert await client.allows("a-session-key", "m") is False
            assert await client.activate(3, 1) is None  # logged, not raised
            assert await client.report_successes({1: 1.0}) is None
            with pytest.raises(PortalError, match="ConnectError"):
                await client.revision()
            with pytest.raises(PortalError):
                await client.load()
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_a_client_starts_from_the_saved_table_while_the_portal_is_down(tmp_path):
    saved = table(deployment("m", [replica_route(9001, 1)]), revision="17.1")
    write_table(tmp_path / "table.json", saved)

    async def scenario() -> None:
        client = down_portal(tmp_path)
        try:
            assert client.cached_table() == saved
            assert await client.revision() == '"17.1"'
            assert await client.load() == saved
            with pytest.raises(PortalError):  # served once; now the portal must answer
                await client.revision()
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_concurrent_saves_of_the_table_each_land_whole(tmp_path):
    # The poll loop and an early poll may save at once (in threads): neither may rename the
    # other's temporary file away (make run logged FileNotFoundError once).
    from concurrent.futures import ThreadPoolExecutor

    from swarm_protocol.private_files import write_private as _write_private

    path = tmp_path / "table.json"
    bodies = [bytes([65 + n]) * 200_000 for n in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda body: _write_private(path, body), bodies * 4))
    assert path.read_bytes() in bodies
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert not list(tmp_path.glob(".table.json.*"))  # no temporary left


def test_a_missing_or_damaged_saved_table_is_none(tmp_path):
    client = down_portal(tmp_path)
    assert client.cached_table() is None
    (tmp_path / "table.json").write_text('{"deployments": {"m": {"name": 1}}}')
    assert client.cached_table() is None
    assert PortalClient("http://x", "t").cached_table() is None  # no path at all


@pytest.mark.parametrize("instance_id", ["", "a" * 65, "has space", "slash/"])
def test_an_instance_id_the_portal_would_refuse_is_refused_at_once(instance_id):
    with pytest.raises(ValueError, match="instance_id"):
        PortalClient("http://127.0.0.1:1", "t", instance_id=instance_id or "bad id")


def test_the_default_instance_id_is_host_and_pid():
    client = PortalClient("http://127.0.0.1:1", "t")
    assert client.instance_id.endswith(f":{os.getpid()}") and len(client.instance_id) <= 64


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_client_reaches_the_portal_over_a_unix_socket(tmp_path, operator):
    from django.test import Client

    from serving.gateway_api import issue_gateway_token
    from tests.live import LivePortal

    socket_path = tmp_path / "portal.sock"
    portal = LivePortal(0, tmp_path / "artifacts")
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "swarm_portal.asgi:application", "--uds",
         str(socket_path), "--log-level", "warning"], cwd=REPO_ROOT, env=portal.env)
    browser = Client()
    browser.force_login(operator)

    async def scenario(secret: str) -> None:
        client = PortalClient("http://localhost", secret, uds_path=str(socket_path),
                              table_cache_path=tmp_path / "table.json", instance_id="uds")
        try:
            etag = await client.revision()
            assert (await client.load()).revision == etag.strip('"')
            assert await client.revision() == etag  # a 304 now
            assert await client.allows(browser.session.session_key, "m") is True
        finally:
            await client.aclose()
        # A refused token is not an outage: no falling back to the saved table.
        refused = PortalClient("http://localhost", "swg_wrong", uds_path=str(socket_path),
                               table_cache_path=tmp_path / "table.json")
        try:
            assert refused.cached_table() is not None
            with pytest.raises(PortalRefused, match="401"):
                await refused.revision()
        finally:
            await refused.aclose()

    try:
        wait_until(lambda: _healthy_on(socket_path), 60, "the portal on its socket")
        asyncio.run(scenario(issue_gateway_token("uds")[1]))
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert oct((tmp_path / "table.json").stat().st_mode & 0o777) == "0o600"


def _healthy_on(socket_path: Path) -> bool:
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path))) as client:
            return client.get("http://localhost/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
