"""High availability with real processes on loopback: deploy/'s nginx in front of gateways.

nginx runs deploy/nginx/swarm.conf itself (placeholders replaced: loopback ports, a
certificate made here), TLS included, in front of two gateway processes, which route to
real replica processes. Client threads post inference requests over HTTPS all along and
never retry, so any error or non-200 answer counts as a failure.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serving.gateway.filesource import write_table
from tests.chaos_helpers import Phase, load_average
from tests.gateway_helpers import (
    BEARER,
    MLP,
    deployment,
    launch_replica,
    mlp_artifact,
    replica_route,
    table,
)
from tests.ha_helpers import (
    DEPLOY,
    PLACEHOLDER,
    ROOT,
    GatewayProcess,
    Nginx,
    TlsLoad,
    make_certificate,
    nginx_binary,
    retried,
    served_by,
)
from tests.replica_models import MLP_SIGNATURE, free_port, wait_until_ready
from tests.waiting import wait_until

needs_nginx = pytest.mark.skipif(nginx_binary() is None,
                                reason="nginx is not installed (apt-get install nginx-light)")
CLIENT_THREADS = 3
REQUEST_TIMEOUT_S = 30.0
logging.getLogger("httpx").setLevel(logging.WARNING)


def nginx_values(directory: Path, gateways: list[str], portal: str) -> dict[str, str]:
    """Return the placeholders of deploy/nginx/swarm.conf for a loopback test."""
    cert, key = make_certificate(directory)
    return {"SERVER_NAME": "localhost", "BIND": "127.0.0.1", "HTTP_PORT": str(free_port()),
            "HTTPS_PORT": str(free_port()), "GRPC_PORT": str(free_port()),
            "TLS_CERT": str(cert), "TLS_KEY": str(key), "PORTAL": portal,
            "GATEWAY_1": gateways[0], "GATEWAY_2": gateways[1],
            # No gRPC in this test: ports nobody listens on.
            "GATEWAY_GRPC_1": f"127.0.0.1:{free_port()}",
            "GATEWAY_GRPC_2": f"127.0.0.1:{free_port()}",
            "ACCESS_LOG": str(directory / "access.log")}


@needs_nginx
def test_nginx_accepts_the_deploy_configuration(tmp_path: Path):
    values = nginx_values(tmp_path, ["127.0.0.1:1", "127.0.0.1:2"], "127.0.0.1:3")
    output = Nginx(tmp_path / "nginx", values).check()
    assert "test is successful" in output
    rendered = (tmp_path / "nginx" / "swarm.conf").read_text()
    assert not PLACEHOLDER.search(rendered)


UNITS = sorted((DEPLOY / "systemd").glob("swarm-*"))
# What systemd would put in place of the units' specifiers and ${VARIABLES} (--help only).
SPECIFIERS = {"%i": "8101", "%d": "/run/credentials/x", "%C": "/var/cache", "%l": "host",
              "${SWARM_PORTAL_URL}": "http://127.0.0.1:8000", "${SWARM_GATEWAY_HOST}": "127.0.0.1",
              "${SWARM_GATEWAY_GRPC_PORT}": "0"}


def installed_here(text: str) -> str:
    """Return a unit's text with /opt/swarm-portal (and its .venv) pointing at this checkout."""
    venv_bin = str(Path(sys.executable).parent)
    return (text.replace("/opt/swarm-portal/.venv/bin", venv_bin)
            .replace("/opt/swarm-portal", str(ROOT)))


def command_lines(text: str) -> list[list[str]]:
    """Return the ExecStart/ExecStartPre command lines of a unit, specifiers filled in."""
    lines = text.replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        if line.startswith(("ExecStart=", "ExecStartPre=")):
            command = line.split("=", 1)[1]
            for specifier, value in SPECIFIERS.items():
                command = command.replace(specifier, value)
            commands.append(shlex.split(command))
    return commands


@pytest.mark.slow
def test_every_flag_in_the_systemd_units_exists(tmp_path: Path):
    assert {unit.name for unit in UNITS} >= {
        "swarm-portal.service", "swarm-portal.socket", "swarm-gateway@.service",
        "swarm-celery-worker.service", "swarm-celery-beat.service"}
    commands = [c for unit in UNITS for c in command_lines(installed_here(unit.read_text()))]
    assert len(commands) == 5  # migrate, portal, gateway, worker, beat
    for command in commands:
        result = subprocess.run([*command, "--help"], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, f"{command}: {result.stderr[-2000:]}"
        flags = [arg.split("=", 1)[0] for arg in command if arg.startswith("--")]
        missing = [flag for flag in flags if flag not in result.stdout]
        assert not missing, f"{command[:4]}: no such options {missing}"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verifies_the_units(tmp_path: Path):
    names = []
    for unit in UNITS:
        name = unit.name.replace("@.service", "@8101.service")
        (tmp_path / name).write_text(installed_here(unit.read_text()))
        names.append(name)
    result = subprocess.run(["systemd-analyze", "verify", *names], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "swarm-" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def standalone_gateway(directory: Path, table_path: Path, name: str) -> GatewayProcess:
    port = free_port()
    command = [sys.executable, "-m", "serving.gateway.standalone", "--table", str(table_path),
               "--host", "127.0.0.1", "--port", str(port)]
    return GatewayProcess(command, port, directory / f"{name}.log", dict(os.environ))


@pytest.fixture
def front(tmp_path: Path) -> Iterator[dict]:
    """Two replicas, two gateways on a table file, nginx in front; all stopped after."""
    artifact = mlp_artifact(tmp_path)
    replicas = [launch_replica(tmp_path, artifact, MLP_SIGNATURE, port=free_port(), tag=str(i),
                               name=MLP, version=1) for i in range(2)]
    gateways: list[GatewayProcess] = []
    nginx: Nginx | None = None
    try:
        for replica in replicas:
            wait_until_ready(replica)
        table_path = tmp_path / "table.json"
        write_table(table_path, table(deployment(
            MLP, [replica_route(r, i + 1) for i, r in enumerate(replicas)])))
        gateways = [standalone_gateway(tmp_path, table_path, f"gateway-{i}") for i in (1, 2)]
        for gateway in gateways:
            gateway.start()
        nginx = Nginx(tmp_path / "nginx", nginx_values(
            tmp_path, [g.address for g in gateways], f"127.0.0.1:{free_port()}")).start()
        yield {"nginx": nginx, "gateways": gateways, "cert": tmp_path / "tls-cert.pem"}
    finally:
        if nginx is not None:
            nginx.stop()
        for gateway in gateways:
            gateway.stop()
        for replica in replicas:
            replica.stop()


def report(phases: list[Phase]) -> str:
    lines = [f"load average {load_average()}"]
    for phase in phases:
        lines.append(f"{phase.name}: sent {phase.sent}, failed {phase.failed}, "
                     f"slowest {phase.slowest_s:.2f} s")
        lines += [f"    {failure}" for failure in phase.failures]
    return "\n".join(lines)


@needs_nginx
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_9_of_a_gateway_behind_nginx_fails_no_request(front):
    nginx, (first, second) = front["nginx"], front["gateways"]
    plain = httpx.get(f"http://127.0.0.1:{nginx.values['HTTP_PORT']}/v2/health/ready")
    assert plain.status_code == 301
    assert plain.headers["location"] == f"{nginx.url}/v2/health/ready"
    url = f"{nginx.url}/v2/models/{MLP}/infer"
    load = TlsLoad(url, dict(BEARER), CLIENT_THREADS, REQUEST_TIMEOUT_S, front["cert"]).start()
    try:
        offset = nginx.log_size()
        wait_until(lambda: min(served_by(nginx.upstreams_since(offset))[g.address]
                               for g in (first, second)) >= 20, 60,
                   "requests served through both gateways")
        killed = load.begin("kill -9 one gateway")
        offset = nginx.log_size()
        first.kill()
        wait_until(lambda: killed.sent >= 200 and retried(nginx.upstreams_since(offset)), 60,
                   "requests after the kill, one retried by nginx")
        tried = nginx.upstreams_since(offset)
        back = load.begin("the gateway restarted")
        first.start()
        offset = nginx.log_size()
        # nginx leaves a failed gateway out for fail_timeout (5 s), then tries it again.
        wait_until(lambda: served_by(nginx.upstreams_since(offset))[first.address] >= 20, 30,
                   "requests served by the restarted gateway again")
    finally:
        load.stop()
        print(report(load.phases))
    assert [(p.name, p.failed, p.failures) for p in load.phases if p.failed] == []
    print(f"after the kill: served {dict(served_by(tried))}, retried {retried(tried)}")
    assert retried(tried) >= 1
    assert back.sent > 0
