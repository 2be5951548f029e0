"""The local provider: `swarm-worker` processes on this machine, started and stopped here.

Workers are named local-1, local-2, ... (lowest free index first), each with its own
block of replica ports from `base_port`, its cache under SWARM_VAR_DIR/workers/<name>,
and a state file SWARM_VAR_DIR/local-fleet/<name>.json (pid, start time, ports). The
state files are the fleet: the Celery worker that decides and the launcher that shuts
down both see the same one, and a restart of either forgets nothing. A worker joins
with a fresh single-use join token only while its cache holds no credentials; after
that it rejoins as the same node. Stopping is SIGTERM: the agent drains its replicas,
deregisters and exits, and its state file goes once it has.

Importing this module loads no Django: the launcher stops the fleet without it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

from scaling.nodeplan import NodeBounds
from scaling.providers import processes
from scaling.providers.base import ProviderError
from serving.agent.credentials import load_credentials, node_state_dir

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent.parent
NAME_PREFIX = "local-"
MAX_PORT = 65535
TOKEN_LIFETIME = timedelta(minutes=10)
KILL_WAIT_S = 5.0
# The agent reads a join token from here: in the environment, not on the command line,
# where `ps` shows it to every user of the machine.
JOIN_TOKEN_ENV = "SWARM_JOIN_TOKEN"  # noqa: S105 - a variable name
# The workers started here run on the portal's own machine, so an http:// portal URL (even
# on a LAN address, SWARM_HOST) never crosses a network: swarm-worker's check allows it.
LOCAL_WORKER_ENV = {"SWARM_WORKER_ALLOW_HTTP_PORTAL": "1"}
# The portal's secrets stay with the portal: a worker needs none of them.
PORTAL_ONLY_ENV = ("DJANGO_SETTINGS_MODULE", "SECRET_KEY", "DATABASE_URL", "REDIS_URL",
                   "METRICS_TOKEN", "SWARM_ADMIN_PASSWORD")


@dataclass(frozen=True)
class WorkerRecord:
    """What the state file of one local worker holds."""

    name: str
    pid: int
    start_ticks: int
    ports: str
    portal_url: str
    started_at: float  # unix seconds
    stopping_since: float | None = None


# A worker this portal started exits (after draining) once its portal has been gone this
# long: a portal killed without its stop_all() must not leave workers heartbeating nothing.
PORTAL_LOST_EXIT_S = 300.0


class LocalProcessProvider:
    """Starts and stops `swarm-worker` processes on this machine, within bounds."""

    name = "local"

    def __init__(self, var_dir: Path, portal_url: str, *, min_nodes: int = 1,
                 max_nodes: int = 3, idle_release_s: float = 60.0, base_port: int = 9100,
                 ports_per_node: int = 50, agent_command: Sequence[str] | None = None,
                 agent_args: Sequence[str] = (),
                 create_token: Callable[[str], str] | None = None) -> None:
        self.bounds = NodeBounds(min_nodes=min_nodes, max_nodes=max_nodes,
                                 idle_release_s=idle_release_s)
        self.portal_url = portal_url.rstrip("/")
        self.fleet_dir = Path(var_dir) / "local-fleet"
        self.workers_dir = Path(var_dir) / "workers"
        self.base_port, self.ports_per_node = base_port, ports_per_node
        self.agent_command = list(agent_command or
                                  [sys.executable, "-m", "serving.agent.cli"])
        self.agent_args = list(agent_args)
        self._create_token = create_token or create_join_token

    # -- what runs ------------------------------------------------------------------

    def managed_names(self) -> set[str]:
        """Return the names of the workers running now that are not being stopped."""
        return {record.name for record in self.records() if record.stopping_since is None}

    def records(self) -> list[WorkerRecord]:
        """Return the live workers' records; forget the state of those that have exited."""
        live = []
        for path in sorted(self.fleet_dir.glob(f"{NAME_PREFIX}*.json")):
            record = _read_record(path)
            if record and processes.is_alive(record.pid, record.start_ticks):
                live.append(record)
            else:
                path.unlink(missing_ok=True)
        return live

    def state_path(self, name: str) -> Path:
        """Return the state file of the worker called `name`."""
        return self.fleet_dir / f"{name}.json"

    # -- start ----------------------------------------------------------------------

    def start_nodes(self, count: int, *, counted: int | None = None) -> list[str]:
        """Start `count` workers (fewer if ports run out); return their names.

        `counted`: how many workers the caller saw running when it decided. Workers
        another decider started since (the launcher at start-up, a Celery tick) count
        toward `count`: a decision taken outside the lock must not start them twice.
        """
        if count <= 0:
            return []
        started = []
        with self._fleet_lock():  # two deciders never pick the same name
            if counted is not None:
                count -= max(0, len(self.managed_names()) - counted)
            for name in self._free_names(count):
                if self._start_worker(name):
                    started.append(name)
        return started

    def _free_names(self, count: int) -> list[str]:
        # Every record counts, those stopping too: a draining worker still holds its
        # cache directory (the agent locks it) and its ports.
        taken = {record.name for record in self.records()}
        names, index = [], 1
        while len(names) < count and self._ports(index)[1] <= MAX_PORT:
            name = f"{NAME_PREFIX}{index}"
            if name not in taken:
                names.append(name)
            index += 1
        if len(names) < count:
            log.warning("local fleet: no replica ports left for %d more workers",
                        count - len(names))
        return names

    def _ports(self, index: int) -> tuple[int, int]:
        first = self.base_port + (index - 1) * self.ports_per_node
        return first, first + self.ports_per_node - 1

    def _start_worker(self, name: str) -> bool:
        first, last = self._ports(int(name.removeprefix(NAME_PREFIX)))
        command = self._command(name, f"{first}-{last}")
        env = _worker_env()
        if not self.has_credentials(name):
            env[JOIN_TOKEN_ENV] = self._create_token(name)
        self.fleet_dir.mkdir(parents=True, exist_ok=True)
        pid = processes.spawn_detached(command, self.fleet_dir / f"{name}.log", cwd=ROOT,
                                       env=env)
        ticks = processes.start_ticks(pid)
        if ticks is None:
            log.warning("local fleet: %s exited at once; see %s", name,
                        self.fleet_dir / f"{name}.log")
            return False
        record = WorkerRecord(name=name, pid=pid, start_ticks=ticks, ports=f"{first}-{last}",
                              portal_url=self.portal_url, started_at=time.time())
        _write_record(self.state_path(name), record)
        log.info("local fleet: started %s (pid %d, ports %s)", name, pid, record.ports)
        return True

    def _command(self, name: str, ports: str) -> list[str]:
        cache_dir = self.workers_dir / name
        return [*self.agent_command, "--portal", self.portal_url, "--name", name,
                "--port-range", ports, "--cache-dir", str(cache_dir),
                "--portal-lost-exit-s", f"{PORTAL_LOST_EXIT_S:g}", *self.agent_args]

    def has_credentials(self, name: str) -> bool:
        """Return whether the worker's cache holds credentials for this portal."""
        state_dir = node_state_dir(self.workers_dir / name, name)
        return load_credentials(state_dir, self.portal_url) is not None

    # -- stop -----------------------------------------------------------------------

    def stop_node(self, name: str) -> bool:
        """Send SIGTERM (drain, deregister, exit); return whether the worker was running."""
        record = next((r for r in self.records() if r.name == name), None)
        if record is None:
            return False
        if not processes.send_signal(record.pid, signal.SIGTERM, record.start_ticks):
            self.state_path(name).unlink(missing_ok=True)
            return False
        if record.stopping_since is None:
            _write_record(self.state_path(name), replace(record, stopping_since=time.time()))
        log.info("local fleet: stopping %s (pid %d)", name, record.pid)
        return True

    def stop_all(self, timeout_s: float) -> None:
        """Stop every worker: SIGTERM, wait up to `timeout_s`, then SIGKILL what is left."""
        pids = {record.pid: record.start_ticks for record in self.records()}
        # Also any agent of this fleet without a state file (a start cut short between
        # spawning it and writing its record): found by its cache dir.
        pids.update(processes.pids_mentioning(f"{self.workers_dir}{os.sep}"))
        for pid, ticks in pids.items():
            processes.send_signal(pid, signal.SIGTERM, ticks)
        left = processes.wait_for_exit(pids, timeout_s)
        for pid in left:
            log.warning("local fleet: pid %d did not stop in %g s: killing it", pid, timeout_s)
            processes.kill(pid, pids[pid])
        processes.wait_for_exit({pid: pids[pid] for pid in left}, KILL_WAIT_S)
        self.records()  # forgets every worker that has exited

    @contextmanager
    def _fleet_lock(self) -> Iterator[None]:
        self.fleet_dir.mkdir(parents=True, exist_ok=True)
        with (self.fleet_dir / ".lock").open("ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


def create_join_token(name: str) -> str:
    """Return a fresh single-use join token for one local worker (needs Django)."""
    from django.contrib.auth import get_user_model

    from serving import services

    users = get_user_model().objects.filter(is_active=True).order_by("pk")
    owner = users.filter(is_superuser=True).first() or users.filter(is_staff=True).first()
    if owner is None:
        raise ProviderError("no active admin account to own the local workers' join tokens: "
                            "create one (manage.py ensure_admin)")
    _token, secret = services.do_create_join_token(
        name=f"local fleet: {name}", user=owner, expires_in=TOKEN_LIFETIME, uses=1)
    return secret


def _worker_env() -> dict[str, str]:
    # A token of ours in this process's environment is not the worker's to reuse.
    return {**{key: value for key, value in os.environ.items()
               if key not in PORTAL_ONLY_ENV and key != JOIN_TOKEN_ENV}, **LOCAL_WORKER_ENV}


def _read_record(path: Path) -> WorkerRecord | None:
    try:
        return WorkerRecord(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as error:
        log.warning("local fleet: ignoring unreadable %s: %s", path, error)
        return None


def _write_record(path: Path, record: WorkerRecord) -> None:
    # Write, then rename: a reader in another process never sees half a file.
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(asdict(record)))
    partial.replace(path)
