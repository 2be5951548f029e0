"""Real processes for the chaos test: a Redis of its own, `make run`'s launcher, a load.

Everything here is started the way a user starts it (`python -m swarm_portal.launcher`,
`redis-server`) on loopback ports of its own, and read back through /proc, the REST API
and the gateway. No Django: the launcher's children own the database.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.process_tree import children_of, cmdline
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
DEMO = "demo-mlp"
ROW = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4],
                   "data": [0.5, -1.0, 2.0, 0.25]}]}
# The launcher's own environment, as a user's shell would give it: none of the test
# session's portal settings (its database, its Redis, its settings module).
NOT_INHERITED = ("DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE", "SWARM_JOIN_TOKEN",
                 "CACHE_KEY_PREFIX", "SECRET_KEY")


class RedisServer:
    """A redis-server of the test's own on a loopback port: no persistence at all."""

    def __init__(self, port: int, directory: Path) -> None:
        self.port, self.directory = port, directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no",
                 "--bind", "127.0.0.1", "--dir", str(self.directory)],
                stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.answers, 15, "redis-server to answer PING")
        return self

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM, as a service manager stops it; wait until it has exited."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Launcher:
    """`make run` (python -m swarm_portal.launcher) on a directory and ports of its own."""

    def __init__(self, var_dir: Path, port: int, redis_url: str, base_port: int) -> None:
        self.var_dir, self.port = var_dir, port
        self.url = f"http://127.0.0.1:{port}"
        inherited = {key: value for key, value in os.environ.items()
                     if key not in NOT_INHERITED}
        self.env = {**inherited, "SWARM_VAR_DIR": str(var_dir), "SWARM_PORT": str(port),
                    "REDIS_URL": redis_url, "SCALING_PROVIDER": "local",
                    "LOCAL_FLEET_MIN_NODES": "2", "LOCAL_FLEET_MAX_NODES": "3",
                    "LOCAL_FLEET_BASE_PORT": str(base_port),
                    "SWARM_ADMIN_PASSWORD": "chaos-test-pw",
                    "SWARM_GRPC_PORT": "0",  # off: a fixed port would clash across tests
                    "SWARM_GATEWAY_PROCESSES": "2"}  # one is SIGTERMed, the other serves
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Launcher:
        self.var_dir.mkdir(parents=True, exist_ok=True)
        with (self.var_dir.parent / "launcher.log").open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "swarm_portal.launcher"],
                                         cwd=ROOT, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)
        return self

    def manage(self, *args: str) -> str:
        """Run a management command on the launcher's embedded default; return its output."""
        result = subprocess.run([sys.executable, "-m", "swarm_portal.launcher", "manage",
                                 *args], cwd=ROOT, env=self.env, check=True,
                                stdout=subprocess.PIPE, text=True, timeout=120)
        return result.stdout.strip()

    def child(self, marker: str) -> int | None:
        """Return the pid of the launcher's one child whose command line has `marker`."""
        assert self.proc is not None
        found = [pid for pid in children_of(self.proc.pid) if marker in cmdline(pid)]
        return found[0] if len(found) == 1 else None

    def agent_pid(self, node_name: str) -> int | None:
        """Return the pid of the fleet's agent for `node_name`, from its command line."""
        cache_dir = f"--cache-dir {self.var_dir / 'workers' / node_name}"
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and cache_dir in cmdline(int(proc.name)) \
                    and "serving.agent.cli" in cmdline(int(proc.name)):
                return int(proc.name)
        return None

    def last_tick(self) -> int:
        """Return the demo policy's last claimed auto-scaler tick (Celery at work)."""
        database = self.var_dir / "swarm.sqlite3"
        try:
            with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as db:
                row = db.execute("SELECT max(last_tick) FROM scaling_scalingpolicy").fetchone()
        except sqlite3.OperationalError:  # busy or not migrated yet
            return 0
        return int(row[0] or 0)

    def stop(self, timeout_s: float = 120) -> int | None:
        """SIGTERM the launcher (it stops everything, workers drain); return its code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def results(body: Any) -> list[dict[str, Any]]:
    """Return the rows of a list response, paged or not."""
    return body["results"] if isinstance(body, dict) else body


@dataclass
class Phase:
    """What the clients saw while one fault was on."""

    name: str
    sent: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    slowest_s: float = 0.0
    recovery_s: float | None = None
    load_average: str = ""  # when it recovered

    def record(self, error: str | None, took_s: float) -> None:
        self.sent += 1
        self.slowest_s = max(self.slowest_s, took_s)
        if error is not None:
            self.failed += 1
            if len(self.failures) < 10:
                self.failures.append(error)


def infer_url(portal_url: str) -> str:
    return f"{portal_url}/v2/models/{DEMO}/infer"


class SteadyLoad:
    """Client threads posting `ROW` to `url` in a loop, every outcome counted per phase.

    Each request opens a new connection (no keep-alive) and nothing is ever retried: a
    refused connection, a reset, a timeout or any status but 200 is a failure.
    """

    def __init__(self, url: str, headers: dict[str, str], threads: int,
                 timeout_s: float) -> None:
        self.url, self.headers, self.timeout_s = url, headers, timeout_s
        self.phases: list[Phase] = [Phase("warm-up")]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(threads)]

    def start(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    @property
    def current(self) -> Phase:
        return self.phases[-1]

    def begin(self, name: str) -> Phase:
        """Count what follows under a new phase; return it."""
        with self._lock:
            self.phases.append(Phase(name))
            return self.phases[-1]

    def _run(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(headers=self.headers, timeout=self.timeout_s,
                          limits=limits) as client:
            while not self._stop.is_set():
                phase = self.current  # a request counts for the phase it started in
                started_s = time.monotonic()
                error = _post(client, self.url)
                with self._lock:
                    phase.record(error, time.monotonic() - started_s)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 5)


def _post(client: httpx.Client, url: str) -> str | None:
    """Send one inference request; return what went wrong, or None."""
    try:
        response = client.post(url, json=ROW)
    except httpx.HTTPError as exc:
        return repr(exc)
    if response.status_code != 200:
        return f"{response.status_code} {response.text[:200]}"
    return None


def load_average() -> str:
    """Return the 1, 5 and 15 minute load averages, as /proc/loadavg has them."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A minimal ASGI app answering 200 "ok" to every HTTP request (no lifespan)."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        continue
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})
