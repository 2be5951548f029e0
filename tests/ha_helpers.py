"""Real processes for the high-availability test: deploy/'s nginx, gateways, a TLS load.

`Nginx` renders `deploy/nginx/swarm.conf` (the file operators install, placeholders
replaced) into a folder of its own and runs nginx on it in the foreground, loopback only;
`GatewayProcess` runs one gateway on a fixed port so that it can be killed and started
again where nginx expects it; `TlsLoad` is chaos_helpers' SteadyLoad over HTTPS. No
Django here. Also: the placeholders for a loopback nginx, and the systemd units'
command lines as they would run from this checkout.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import httpx

from tests.certs import self_signed_files
from tests.chaos_helpers import SteadyLoad, _post
from tests.replica_models import free_port
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
NGINX_TEMPLATE = DEPLOY / "nginx" / "swarm.conf"
PLACEHOLDER = re.compile(r"@([A-Z0-9_]+)@")
UPSTREAM = re.compile(r"upstream=(\S.*?) upstream_status=")


def nginx_binary() -> str | None:
    """Return the nginx executable (Debian puts it in /usr/sbin, often not on PATH)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    return found


def render(template: str, values: dict[str, str]) -> str:
    """Return `template` with every @NAME@ replaced; KeyError names a missing value."""
    missing = sorted(set(PLACEHOLDER.findall(template)) - set(values))
    if missing:
        raise KeyError(f"no value for placeholders {missing}")
    return PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# TLS


def make_certificate(directory: Path, host: str = "localhost") -> tuple[Path, Path]:
    """Write a self-signed certificate for `host` and 127.0.0.1; return (cert, key) paths."""
    return self_signed_files(directory / "tls-cert.pem", directory / "tls-key.pem", host,
                             [host, "127.0.0.1"], ca=True, server_auth=True)


def client_context(cert_path: Path) -> ssl.SSLContext:
    """Return a client TLS context that trusts only the test certificate."""
    return ssl.create_default_context(cafile=str(cert_path))


# nginx

# The main context Debian's /etc/nginx/nginx.conf provides, with every path in the test's
# folder; deploy/nginx/swarm.conf is included inside `http` as conf.d/ files are.
MAIN_CONF = """\
daemon off;
{user}
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/swarm.conf;
}}
"""


class Nginx:
    """nginx in the foreground on deploy/nginx/swarm.conf rendered with `values`."""

    def __init__(self, directory: Path, values: dict[str, str]) -> None:
        binary = nginx_binary()
        assert binary is not None, "nginx is not installed"
        self.binary, self.directory, self.values = binary, directory, values
        self.https_port = int(values["HTTPS_PORT"])
        self.access_log = Path(values["ACCESS_LOG"])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    def write(self) -> Path:
        """Render both files; return the main configuration's path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "swarm.conf").write_text(
            render(NGINX_TEMPLATE.read_text(), self.values))
        # Workers run as nobody when the master is root; the test's folders are root's
        # alone (mode 700), so the workers keep root's user here, and only here.
        user = "user root;" if os.geteuid() == 0 else ""
        main = self.directory / "nginx.conf"
        main.write_text(MAIN_CONF.format(dir=self.directory, user=user))
        return main

    def command(self, *args: str) -> list[str]:
        return [self.binary, "-p", str(self.directory), "-c", str(self.directory / "nginx.conf"),
                "-e", str(self.directory / "error.log"), *args]

    def check(self) -> str:
        """Run `nginx -t` on the rendered files; return its output (raise if refused)."""
        self.write()
        result = subprocess.run(self.command("-t"), capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stderr

    def start(self) -> Nginx:
        self.check()
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_until(lambda: self._listening(), 15, "nginx to listen")
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"nginx exited: {self.errors()}")
        return port_open(self.https_port)

    def reload(self) -> None:
        """SIGHUP: new workers on the configuration, old ones finish their requests."""
        assert self.proc is not None
        self.write()
        self.proc.send_signal(signal.SIGHUP)

    def errors(self) -> str:
        path = self.directory / "error.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def stop(self) -> None:
        """SIGQUIT (finish requests, then exit); SIGKILL after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def log_size(self) -> int:
        return self.access_log.stat().st_size if self.access_log.exists() else 0

    def upstreams_since(self, offset: int) -> list[list[str]]:
        """Return, per logged request after byte `offset`, the upstreams nginx tried."""
        with self.access_log.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        tried = []
        for line in text.splitlines():
            match = UPSTREAM.search(line)
            if match:  # "a, b" (retried), or "a : b" across upstream groups
                tried.append([part.strip() for part in re.split(r"[,:] ", match.group(1))])
        return tried


def served_by(tried: list[list[str]]) -> Counter[str]:
    """Return how many requests each upstream finally served."""
    return Counter(addresses[-1] for addresses in tried)


def retried(tried: list[list[str]]) -> int:
    """Return how many requests nginx sent to more than one upstream."""
    return sum(1 for addresses in tried if len(addresses) > 1)


def nginx_values(directory: Path, gateways: list[str], portal: str,
                 grpc: list[str] | None = None) -> dict[str, str]:
    """Return the placeholders of deploy/nginx/swarm.conf for a loopback test."""
    cert, key = make_certificate(directory)
    grpc = grpc or [f"127.0.0.1:{free_port()}" for _ in gateways]  # nobody listens there
    return {"SERVER_NAME": "localhost", "BIND": "127.0.0.1", "HTTP_PORT": str(free_port()),
            "HTTPS_PORT": str(free_port()), "GRPC_PORT": str(free_port()),
            "TLS_CERT": str(cert), "TLS_KEY": str(key), "PORTAL": portal,
            "GATEWAY_1": gateways[0], "GATEWAY_2": gateways[1],
            "GATEWAY_GRPC_1": grpc[0], "GATEWAY_GRPC_2": grpc[1],
            "ACCESS_LOG": str(directory / "access.log")}


# gateways


class GatewayProcess:
    """One gateway process on a fixed port (restartable there), its output in a file."""

    def __init__(self, command: Sequence[str], port: int, log_path: Path,
                 env: dict[str, str], grpc_port: int = 0) -> None:
        self.command, self.port, self.log_path, self.env = list(command), port, log_path, env
        self.grpc_port = grpc_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self, timeout_s: float = 60) -> GatewayProcess:
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)
        wait_until(self._ready, timeout_s, f"the gateway on port {self.port}")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the gateway exited: {self.log_path.read_text()[-2000:]}")
        marker = f"--- start {self.starts}\n"
        return "GATEWAY READY" in self.log_path.read_text().rsplit(marker, 1)[-1]

    def terminate(self) -> None:
        """SIGTERM (systemctl stop/restart): stop accepting, finish requests, exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)

    def kill(self) -> None:
        """SIGKILL: no drain, open connections reset (a crash, the OOM killer)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


# load


class TlsLoad(SteadyLoad):
    """SteadyLoad over HTTPS through nginx, trusting the test certificate.

    Each client keeps its connection to nginx (TLS handshakes would eat the CPU the
    processes under test need): the faults are behind nginx, on the gateways and the
    portal, and every failed request still counts.
    """

    def __init__(self, url: str, headers: dict[str, str], threads: int, timeout_s: float,
                 cert_path: Path) -> None:
        super().__init__(url, headers, threads, timeout_s)
        self.context = client_context(cert_path)

    def _run(self) -> None:
        with httpx.Client(headers=self.headers, timeout=self.timeout_s,
                          verify=self.context) as client:
            while not self._stop.is_set():
                phase = self.current  # a request counts for the phase it started in
                started_s = time.monotonic()
                error = _post(client, self.url)
                with self._lock:
                    phase.record(error, time.monotonic() - started_s)


# systemd units

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
