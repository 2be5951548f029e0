"""Real server processes for tests: the portal under uvicorn, sharing the test database,
and `swarm-gateway` in front of it (as `make run` serves both on one URL)."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

import httpx
from django.db import connection

from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
GATEWAY_READY_S = 30.0


def test_database_url() -> str:
    """Return a DATABASE_URL for the database this test run created."""
    params = connection.settings_dict
    if params["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{params['NAME']}"
    user = params.get("USER") or "postgres"
    password = f":{params['PASSWORD']}" if params.get("PASSWORD") else ""
    host = params.get("HOST") or "127.0.0.1"
    port = params.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{params['NAME']}"


def create_gateway_token(env: dict[str, str], name: str) -> str:
    """Return a new gateway token from `manage.py create_gateway_token` on env's database."""
    return subprocess.run([sys.executable, str(ROOT / "manage.py"), "create_gateway_token",
                           name], cwd=ROOT, env=env, check=True, stdout=subprocess.PIPE,
                          text=True, timeout=120).stdout.strip()


class LiveGateway:
    """`swarm-gateway` (serving/gateway/service.py) in a child process, given its token by
    environment; `start` returns once it printed its ready line."""

    def __init__(self, portal_url: str, token: str, *args: str, port: int = 0,
                 portal_uds: Path | None = None, env: dict[str, str] | None = None,
                 host: str = "127.0.0.1") -> None:
        self.command = [sys.executable, "-m", "serving.gateway.service", "--portal", portal_url,
                        "--port", str(port), "--host", host, *args]
        self.host = host
        if portal_uds is not None:
            self.command += ["--portal-uds", str(portal_uds)]
        # Nothing of the portal's: the gateway reaches it only over HTTP.
        self.env = {**{k: v for k, v in os.environ.items()
                       if k not in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE")},
                    "SWARM_GATEWAY_TOKEN": token, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.port = port

    def start(self, stderr: IO[str] | None = None, pass_fds: tuple[int, ...] = ()
              ) -> LiveGateway:
        self.proc = subprocess.Popen(self.command, cwd=ROOT, env=self.env, pass_fds=pass_fds,
                                     stdout=subprocess.PIPE, stderr=stderr, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], GATEWAY_READY_S)
        line = self.proc.stdout.readline().strip() if ready else ""
        if not line.startswith("GATEWAY READY port="):
            self.stop()
            raise AssertionError(f"swarm-gateway did not start: {line!r}")
        self.port = int(line.rsplit("=", 1)[1])
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout_s: float = 30) -> int | None:
        """SIGTERM (it finishes what is in flight), SIGKILL after `timeout_s`; return its code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


class LivePortal:
    """The portal's ASGI app under uvicorn in a child process.

    With `gateway=True` the portal listens on a unix socket and a `swarm-gateway` in
    pass-through mode serves `port`, so `url` serves the pages, the API and /v2 together,
    as `make run` does."""

    def __init__(self, port: int, artifact_root: Path, *, gateway: bool = False,
                 host: str = "127.0.0.1", **env: str) -> None:
        self.port = port
        self.host = host  # where it listens (tests/netns.py: a host end of a test link)
        self.url = f"http://{host}:{port}"
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "swarm_portal.settings",
            "DATABASE_URL": test_database_url(),
            "ARTIFACT_ROOT": str(artifact_root),
            "SECURE_COOKIES": "0",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.gateway: LiveGateway | None = None
        self._socket_dir = Path(tempfile.mkdtemp(prefix="live-portal-")) if gateway else None
        # The gateway's port, held from now on and handed to it (--fd): a port probed free
        # is not reserved, and the portal and a token come first (seconds in which any
        # process's outgoing connection may take it: CI saw "Address already in use").
        self._listener: socket.socket | None = None
        if gateway:
            self._listener = socket.socket()
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(1024)

    @property
    def portal_uds(self) -> Path | None:
        """Return the portal's own unix socket (with a gateway in front), else None."""
        return self._socket_dir / "portal.sock" if self._socket_dir is not None else None

    def start(self, timeout_s: float = 60) -> LivePortal:
        """Start the portal (and its gateway); on any failure stop what was started, and
        close the held port, before raising: callers only stop a portal that started."""
        try:
            return self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> LivePortal:
        where = (["--uds", str(self.portal_uds), "--forwarded-allow-ips", "*"]
                 if self.portal_uds is not None
                 else ["--host", self.host, "--port", str(self.port)])
        command = [sys.executable, "-m", "uvicorn", "swarm_portal.asgi:application", *where,
                   "--log-level", "warning"]
        self.proc = subprocess.Popen(command, cwd=ROOT, env=self.env)
        wait_until(self._healthy, timeout_s, f"the portal on port {self.port}")
        if self.portal_uds is not None:
            token = create_gateway_token(self.env, f"live-{self.port}")
            assert self._socket_dir is not None
            assert self._listener is not None
            fd = self._listener.fileno()
            self.gateway = LiveGateway(
                self.url, token, "--pass-through", "--table-cache",
                str(self._socket_dir / "table.json"), "--fd", str(fd), port=self.port,
                portal_uds=self.portal_uds).start(pass_fds=(fd,))
            wait_until(lambda: self._healthy(self.url), timeout_s, "the gateway in front")
        return self

    def _healthy(self, url: str | None = None) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the portal exited with {self.proc.returncode}")
        transport = (httpx.HTTPTransport(uds=str(self.portal_uds))
                     if url is None and self.portal_uds is not None else None)
        try:
            with httpx.Client(transport=transport, timeout=1) as client:
                return client.get(f"{url or self.url}/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def memory_kib(self, field: str) -> int:
        """Return VmRSS or VmHWM of the server process, in KiB."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"{field} not in /proc/{self.proc.pid}/status")

    def reset_peak_memory(self) -> None:
        """Make VmHWM start again from the current RSS (Linux clear_refs 5)."""
        assert self.proc is not None
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
