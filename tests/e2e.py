"""Real processes for end-to-end tests: Celery (worker + beat) and worker agents."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.live import ROOT, test_database_url


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM,
          timeout_s: float = 30) -> int | None:
    if proc is None or proc.poll() is not None:
        return proc.returncode if proc else None
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def portal_env(artifact_root: Path, var_dir: Path, **extra: str) -> dict[str, str]:
    """Return the environment a portal-side process (server, Celery) of a test runs with."""
    return {**os.environ, "DJANGO_SETTINGS_MODULE": "swarm_portal.settings",
            "DATABASE_URL": test_database_url(), "ARTIFACT_ROOT": str(artifact_root),
            "SWARM_VAR_DIR": str(var_dir), "SECURE_COOKIES": "0", **extra}


class LiveCelery:
    """A Celery worker with an embedded beat, on the configured broker."""

    def __init__(self, env: dict[str, str], var_dir: Path) -> None:
        self.env = env
        self.var_dir = var_dir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LiveCelery:
        for folder in ("celery/queue", "celery/processed"):
            (self.var_dir / folder).mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "celery", "-A", "swarm_portal", "worker", "--beat",
                   "--concurrency", "1", "--loglevel", "WARNING", "--without-mingle",
                   "--without-gossip", "--schedule", str(self.var_dir / "beat-schedule")]
        self.proc = subprocess.Popen(command, cwd=ROOT, env=self.env)
        return self

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM, 20)


class LiveAgent:
    """A `swarm-worker` process joined to a live portal."""

    def __init__(self, portal_url: str, name: str, ports: str, cache_dir: Path,
                 token: str | None, *args: str, address: str | None = None,
                 prefix: Sequence[str] = ()) -> None:
        self.portal_url, self.name, self.ports = portal_url, name, ports
        self.cache_dir, self.token = cache_dir, token
        # More swarm-worker arguments; its advertised --address; a command to run it under
        # (tests/netns.py: `ip netns exec NAME`, a machine of its own).
        self.args = [*args, *(["--address", address] if address else [])]
        self.prefix = list(prefix)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LiveAgent:
        command = [sys.executable, "-m", "serving.agent.cli", "--portal", self.portal_url,
                   "--name", self.name, "--port-range", self.ports, "--cache-dir",
                   str(self.cache_dir), "--drain-grace-s", "20", "--log-level", "INFO",
                   # A killed agent's replicas outlive it for this long (a restarted agent
                   # would adopt them), then drain themselves.
                   "--replica-watchdog-s", "5", *self.args]
        env = {k: v for k, v in os.environ.items()
               if k not in ("DJANGO_SETTINGS_MODULE", "SWARM_JOIN_TOKEN")}
        if self.token:  # in the environment: a command line is readable by every user (ps)
            env["SWARM_JOIN_TOKEN"] = self.token
        self.proc = subprocess.Popen([*self.prefix, *command], cwd=ROOT, env=env)
        return self

    def kill(self) -> None:
        """SIGKILL: no drain, no deregister (a crashed or unplugged machine)."""
        _stop(self.proc, signal.SIGKILL, 10)

    def terminate(self, timeout_s: float = 60) -> int | None:
        """SIGTERM: drain every replica, deregister, exit."""
        return _stop(self.proc, signal.SIGTERM, timeout_s)
