"""Real server processes for tests: the portal under uvicorn, sharing the test database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from django.db import connection

from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent


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


class LivePortal:
    """The portal's ASGI app under uvicorn in a child process."""

    def __init__(self, port: int, artifact_root: Path, **env: str) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "swarm_portal.settings",
            "DATABASE_URL": test_database_url(),
            "ARTIFACT_ROOT": str(artifact_root),
            "SECURE_COOKIES": "0",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60) -> LivePortal:
        command = [sys.executable, "-m", "uvicorn", "swarm_portal.asgi:application",
                   "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        self.proc = subprocess.Popen(command, cwd=ROOT, env=self.env)
        wait_until(self._healthy, timeout_s, f"the portal on port {self.port}")
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the portal exited with {self.proc.returncode}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
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
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
