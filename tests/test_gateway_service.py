"""`swarm-gateway` as a process of its own, in front of a real portal and a real replica.

The portal runs under uvicorn on a unix socket and `swarm-gateway --pass-through` serves
its port, as `make run` does (tests/live.py `LivePortal(..., gateway=True)`); the replica is
a real process reported ready through the heartbeat path (tests/test_gateway_portal.py's
Agent). What is shown: /v2 with an API key and with a portal session, the pages, a login
POST with its CSRF token, a large upload and its download streamed through, a dashboard
WebSocket, two processes sharing one port, a SIGTERM under load that fails nothing, and a
gateway started while the portal is away serving the table it saved before.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.test import Client
from knox.models import AuthToken
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from serving import services
from serving.gateway.portal_proxy import PortalProxy, forwarded_headers
from serving.gateway.service import parse_args, read_token
from serving.models import Node
from swarm_portal.launcher import listen
from swarm_protocol.agent_messages import RegisterRequest
from tests import factories
from tests.chaos_helpers import SteadyLoad, load_average
from tests.conftest import free_port
from tests.live import ROOT, LiveGateway, LivePortal, create_gateway_token
from tests.test_gateway_portal import CPU, ROW, Agent
from tests.test_upload_memory import multipart_stream, padded_torchscript
from tests.waiting import wait_until

INFER = "/v2/models/mlp/infer"
UPLOAD_BYTES = 160 * 1024**2
GATEWAY_GROWTH_BUDGET_KIB = 48 * 1024  # a buffered 160 MiB body would be far above this


# -- fast: the pieces, no processes ------------------------------------------------------

def test_hop_by_hop_headers_are_dropped_and_the_client_address_is_forwarded():
    scope = {"headers": [(b"host", b"portal.example"), (b"connection", b"keep-alive, x-hop"),
                         (b"x-hop", b"1"), (b"keep-alive", b"5"), (b"cookie", b"sessionid=a"),
                         (b"x-csrftoken", b"t"), (b"transfer-encoding", b"chunked"),
                         (b"x-forwarded-for", b"10.0.0.9")],
             "client": ("127.0.0.5", 50000), "scheme": "http"}
    assert forwarded_headers(scope) == [
        (b"host", b"portal.example"), (b"cookie", b"sessionid=a"), (b"x-csrftoken", b"t"),
        (b"x-forwarded-for", b"10.0.0.9, 127.0.0.5"), (b"x-forwarded-proto", b"http")]


async def test_the_pass_through_keeps_no_cookie_from_the_portal():
    # One client serves every user: a login's Set-Cookie kept by it would go out with every
    # later request that has no Cookie header (anonymous requests served as that user).
    proxy = PortalProxy("http://127.0.0.1:1")
    try:
        login = httpx.Response(302, headers=[("set-cookie", "sessionid=s; Path=/; HttpOnly"),
                                             ("set-cookie", "csrftoken=c; Path=/")],
                               request=httpx.Request("POST", "http://127.0.0.1:1/login/"))
        proxy._client.cookies.extract_cookies(login)
        stranger = proxy._client.build_request("GET", "http://127.0.0.1:1/overview/")
        assert "cookie" not in stranger.headers
        own = proxy._client.build_request("GET", "http://127.0.0.1:1/overview/",
                                          headers={"cookie": "sessionid=mine"})
        assert own.headers["cookie"] == "sessionid=mine"
    finally:
        await proxy.aclose()


def test_a_token_on_the_command_line_is_refused(capsys):
    with pytest.raises(SystemExit) as refused:
        parse_args(["--portal", "http://p", "--token", "gwt_secret"])
    assert refused.value.code == 2
    assert "never put the gateway token on the command line" in capsys.readouterr().err


def test_the_token_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("SWARM_GATEWAY_TOKEN", raising=False)
    with pytest.raises(ValueError, match="no gateway token"):
        read_token(None)
    monkeypatch.setenv("SWARM_GATEWAY_TOKEN", "from-env")
    assert read_token(None) == "from-env"
    (tmp_path / "token").write_text("from-file\n")
    assert read_token(tmp_path / "token") == "from-file"
    (tmp_path / "token").write_text("two words")
    with pytest.raises(ValueError, match="not a token"):
        read_token(tmp_path / "token")


def test_the_gateway_process_loads_no_django_channels_or_torch():
    code = ("import sys, serving.gateway.service\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'django', 'channels', 'torch', 'celery'}))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, text=True,
                            stdout=subprocess.PIPE, env={**os.environ,
                                                         "DJANGO_SETTINGS_MODULE": ""})
    assert loaded.stdout.strip() == "[]"


async def test_the_portal_answers_v2_with_a_json_404_naming_the_gateway():
    from swarm_portal.asgi import http_router

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    await http_router({"type": "http", "path": "/v2/models/x/infer", "headers": []},
                      receive, send)
    assert sent[0]["status"] == 404
    assert "swarm-gateway" in json.loads(sent[1]["body"])["error"]


# -- real processes ----------------------------------------------------------------------

@pytest.fixture
def stack(operator, model, model_files, tmp_path, artifact_root) -> Iterator[dict[str, Any]]:
    """A portal behind swarm-gateway, deployment `mlp` on one ready replica, an API key."""
    factories.add_version(model, operator, model_files["torchscript"])
    _token, secret = services.do_create_join_token(name="t", user=operator, expires_in=None,
                                                   uses=None)
    node = Node.objects.get(pk=services.do_register_node(RegisterRequest(
        join_token=secret, name="n", address="127.0.0.1", cost_per_hour=1.0,
        devices=[CPU])).node_id)
    agent = Agent(node, tmp_path, {1: model_files["torchscript"]})
    _key, key = services.do_create_api_key(name="c", user=operator, deployments=None,
                                           expires_in=None, rate_limit_rps=None)
    services.do_create_deployment(name="mlp", model=model, version_number=1, alias_name="",
                                  user=operator, replicas=1)
    portal = LivePortal(free_port(), artifact_root, gateway=True,
                        MAX_UPLOAD_BYTES=str(UPLOAD_BYTES * 2))
    try:
        agent.settle(1)
        portal.start()
        headers = {"Authorization": f"Bearer {key}"}
        wait_until(lambda: httpx.post(f"{portal.url}{INFER}", json=ROW, headers=headers,
                                      timeout=10).status_code == 200, 30,
                   "inference through the gateway")
        yield {"portal": portal, "headers": headers, "agent": agent, "tmp": tmp_path}
    finally:
        portal.stop()
        agent.close()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_one_url_serves_inference_pages_login_and_a_session(stack, operator):
    url, headers = stack["portal"].url, stack["headers"]
    with httpx.Client(base_url=url, timeout=30) as browser:
        answer = browser.post(INFER, json=ROW, headers=headers)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_name"] == "mlp"
        assert browser.post(INFER, json=ROW).status_code == 401  # no credentials

        page = browser.get("/login/")
        assert page.status_code == 200 and "csrfmiddlewaretoken" in page.text
        csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        # A hash the portal's own hashers check (the tests' settings hash with MD5).
        type(operator).objects.filter(pk=operator.pk).update(password=PBKDF2PasswordHasher(
            ).encode("pw-through-the-gateway", "gatewaysalt", iterations=1000))
        logged_in = browser.post("/login/", data={"username": operator.username,
                                                  "password": "pw-through-the-gateway",
                                                  "csrfmiddlewaretoken": csrf},
                                 headers={"Referer": f"{url}/login/"})
        assert logged_in.status_code == 302, logged_in.text[:500]
        assert "sessionid" in browser.cookies
        assert browser.get("/overview/").status_code == 200
        # A stranger after that login is still a stranger (every gateway process).
        for _ in range(6):
            assert httpx.get(f"{url}/overview/", timeout=30).status_code == 302
        # The playground's call: /v2 with the portal session, checked by the portal.
        assert browser.post(INFER, json=ROW).status_code == 200
        refused = browser.post("/logout/", headers={"X-CSRFToken": "wrong"})
        assert refused.status_code == 403  # CSRF still checked behind the gateway


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_dashboard_websocket_goes_through_and_strangers_are_refused(stack, operator):
    portal = stack["portal"]
    browser = Client()
    browser.force_login(operator)
    cookie = f"sessionid={browser.cookies['sessionid'].value}"
    ws_url, origin = f"ws://127.0.0.1:{portal.port}/ws/overview/", portal.url
    with connect(ws_url, origin=origin, additional_headers={"Cookie": cookie},
                 open_timeout=30) as socket_:
        socket_.send(json.dumps({"type": "ping"}))
        assert json.loads(socket_.recv(timeout=30)) == {"type": "pong"}
    with pytest.raises(InvalidStatus) as refused, connect(ws_url, origin=origin,
                                                           open_timeout=30):
        pass
    assert refused.value.response.status_code == 403


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_large_upload_and_its_download_stream_through_the_gateway(stack, operator):
    portal, tmp = stack["portal"], stack["tmp"]
    factories.make_model(operator, name="big")
    _, token = AuthToken.objects.create(user=operator, expiry=None)
    path = padded_torchscript(tmp / "big.pt", UPLOAD_BYTES)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    gateway = portal.gateway
    assert gateway is not None and gateway.proc is not None
    auth = {"Authorization": f"Token {token}"}
    Path(f"/proc/{gateway.proc.pid}/clear_refs").write_text("5")  # VmHWM from here
    before_kib = memory_kib(gateway.proc.pid, "VmRSS")
    with httpx.Client(base_url=portal.url, timeout=300) as client:
        body, length = multipart_stream(path, "gw-boundary")
        created = client.post("/api/models/big/versions/", content=body, headers={
            **auth, "Content-Length": str(length),
            "Content-Type": "multipart/form-data; boundary=gw-boundary"})
        assert created.status_code == 201, created.text
        assert created.json()["sha256"] == digest
        downloaded = hashlib.sha256()
        with client.stream("GET", "/api/models/big/versions/1/artifact",
                           headers=auth) as response:
            assert response.status_code == 200
            for chunk in response.iter_raw():
                downloaded.update(chunk)
    assert downloaded.hexdigest() == digest
    growth_kib = memory_kib(gateway.proc.pid, "VmHWM") - before_kib
    print(f"gateway RSS +{growth_kib / 1024:.1f} MiB for a {UPLOAD_BYTES >> 20} MiB upload "
          "and its download")
    assert growth_kib < GATEWAY_GROWTH_BUDGET_KIB


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_two_gateway_processes_share_one_port_with_reuse_port(stack):
    portal, headers = stack["portal"], stack["headers"]
    port = free_port()
    gateways = [LiveGateway(portal.url, create_gateway_token(portal.env, f"rp-{index}"),
                            "--reuse-port", port=port, portal_uds=portal.portal_uds)
                for index in range(2)]
    clients: list[httpx.Client] = []
    try:
        for gateway in gateways:
            gateway.start()
        for _ in range(16):  # each client keeps its one connection open
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers,
                                  timeout=30)
            assert client.post(INFER, json=ROW).status_code == 200
            clients.append(client)
        accepted = [established_on(gateway.proc.pid, port) for gateway in gateways]
        # At least our 16 (a readiness probe's connection may not be closed yet: CI saw 17),
        # and each process took some: the kernel spreads connections over both sockets.
        assert sum(accepted) >= 16 and min(accepted) > 0, accepted
    finally:
        for client in clients:
            client.close()
        for gateway in gateways:
            gateway.stop()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_sigterm_to_one_of_two_gateways_on_a_shared_socket_fails_no_request(stack):
    """As make run runs them: one listening socket, held by the parent, in both."""
    portal, headers = stack["portal"], stack["headers"]
    listener = listen("127.0.0.1", 0)
    port, fd = listener.getsockname()[1], listener.fileno()
    gateways = [LiveGateway(portal.url, create_gateway_token(portal.env, f"fd-{index}"),
                            "--fd", str(fd), portal_uds=portal.portal_uds)
                for index in range(2)]
    load = SteadyLoad(f"http://127.0.0.1:{port}{INFER}", headers, threads=4, timeout_s=30)
    try:
        for gateway in gateways:
            gateway.start(pass_fds=(fd,))
        load.start()
        wait_until(lambda: load.current.sent >= 50, 60, "a steady load")
        phase = load.begin("sigterm")
        # uvicorn ends by raising the signal it caught again, once it has stopped: -15, not
        # -9 (what stop() sends when the graceful stop takes too long).
        assert gateways[0].stop() == -signal.SIGTERM
        wait_until(lambda: phase.sent >= 100, 60, "requests after the SIGTERM")
        after = load.begin("one left")
        wait_until(lambda: after.sent >= 50, 60, "the other gateway serving alone")
    finally:
        load.stop()
        for gateway in gateways:
            gateway.stop()
        listener.close()
    print("phases:", [(p.name, p.sent, p.failed) for p in load.phases], load_average())
    assert [p.failures for p in load.phases] == [[], [], []]


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_gateway_started_while_the_portal_is_away_serves_its_saved_table(stack):
    portal, headers, tmp = stack["portal"], stack["headers"], stack["tmp"]
    saved = portal.portal_uds.parent / "table.json"
    wait_until(saved.exists, 10, "the table saved by the running gateway")
    assert saved.stat().st_mode & 0o077 == 0  # it holds replica keys
    cache = tmp / "cache" / "table.json"
    cache.parent.mkdir()
    shutil.copy(saved, cache)
    dead_uds = tmp / "nobody-listens.sock"
    away = LiveGateway(f"http://127.0.0.1:{free_port()}", "gwt_any-token", "--pass-through",
                       "--table-cache", str(cache), portal_uds=dead_uds)
    try:
        away.start()
        with httpx.Client(base_url=away.url, headers=headers, timeout=30) as client:
            assert client.get("/v2/health/ready").status_code == 200
            answer = client.post(INFER, json=ROW)
            assert answer.status_code == 200, answer.text
            page = client.get("/login/")
            assert page.status_code == 502
            assert "portal is not reachable" in page.json()["error"]
    finally:
        away.stop()


def memory_kib(pid: int, field: str) -> int:
    """Return VmRSS or VmHWM of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def established_on(pid: int, port: int) -> int:
    """Return how many established TCP connections on local `port` the process holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if fields[3] == "01" and local_port == port and fields[9] in inodes:
                count += 1
    return count

