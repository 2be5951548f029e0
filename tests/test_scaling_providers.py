"""GPU-server providers: the local fleet of worker processes, the static provider, the tick.

The fast tests run a stand-in agent (a few lines of Python that wait for SIGTERM) to
check names, ports, tokens, state files and stopping; the slow one runs real
`swarm-worker` agents against a live portal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from scaling.node_services import tick_nodes
from scaling.nodeplan import NodeBounds
from scaling.providers import (
    LocalProcessProvider,
    ProviderError,
    StaticProvider,
    get_provider,
    processes,
)
from serving import services
from serving.agent.credentials import NodeCredentials, node_state_dir, save_credentials
from serving.models import JoinToken, Node, NodeStatus
from swarm_protocol.agent_messages import DeviceInfo, RegisterRequest
from tests import factories
from tests.conftest import free_port
from tests.live import LivePortal
from tests.process_tree import cmdline, live_processes_mentioning
from tests.waiting import wait_until

PORTAL_URL = "http://127.0.0.1:8000"
CPU = DeviceInfo(index=0, kind="cpu", name="cpu", uuid="cpu-0",
                 memory_total_bytes=64 * 1024**3, memory_used_bytes=0, utilization_pct=1.0)
# A stand-in agent: writes its arguments into its cache dir, then waits for SIGTERM
# (or ignores it, with --ignore-term).
FAKE_AGENT = """
import json, os, pathlib, signal, sys, time
args = sys.argv[1:]
cache = pathlib.Path(args[args.index("--cache-dir") + 1])
cache.mkdir(parents=True, exist_ok=True)
(cache / "token.json").write_text(json.dumps(os.environ.get("SWARM_JOIN_TOKEN")))
(cache / "argv.json").write_text(json.dumps(args))
stop = []
handler = signal.SIG_IGN if "--ignore-term" in args else (lambda *_: stop.append(1))
signal.signal(signal.SIGTERM, handler)
while not stop:
    time.sleep(0.05)
"""


class TokenMint:
    """Stands in for the portal's join tokens: counts how many were asked for."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __call__(self, name: str) -> str:
        self.names.append(name)
        return f"swj_test_{name}"


@pytest.fixture
def mint() -> TokenMint:
    return TokenMint()


@pytest.fixture
def fleet(tmp_path: Path, mint: TokenMint):
    """A local provider running stand-in agents; every one is stopped after the test."""
    provider = make_provider(tmp_path, mint)
    yield provider
    provider.stop_all(timeout_s=0.5)


def make_provider(var_dir: Path, mint: TokenMint, *args: str) -> LocalProcessProvider:
    return LocalProcessProvider(var_dir, PORTAL_URL, agent_command=[sys.executable, "-c",
                                                                    FAKE_AGENT],
                                agent_args=args, create_token=mint)


def argv_of(provider: LocalProcessProvider, name: str) -> list[str]:
    path = provider.workers_dir / name / "argv.json"
    return wait_until(lambda: path.exists() and json.loads(path.read_text()), 10,
                      f"{name} to start")


def token_of(provider: LocalProcessProvider, name: str) -> str | None:
    """Return the join token the worker found in its environment."""
    argv_of(provider, name)
    return json.loads((provider.workers_dir / name / "token.json").read_text())


def option(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_workers_get_the_lowest_free_name_their_own_ports_and_a_token(fleet, mint):
    assert fleet.start_nodes(2) == ["local-1", "local-2"]
    first, second = argv_of(fleet, "local-1"), argv_of(fleet, "local-2")
    assert (option(first, "--port-range"), option(second, "--port-range")) == (
        "9100-9149", "9150-9199")
    assert option(first, "--portal") == PORTAL_URL
    assert option(first, "--cache-dir") == str(fleet.workers_dir / "local-1")
    assert token_of(fleet, "local-1") == "swj_test_local-1"
    assert mint.names == ["local-1", "local-2"]
    record = json.loads(fleet.state_path("local-1").read_text())
    assert record["ports"] == "9100-9149"
    assert processes.is_alive(record["pid"], record["start_ticks"])

    assert fleet.stop_node("local-1")
    wait_until(lambda: [record.name for record in fleet.records()] == ["local-2"]
               and not fleet.state_path("local-1").exists(), 10,
               "local-1 to exit and its state file to go")
    assert fleet.start_nodes(1) == ["local-1"]  # the lowest free name again
    assert fleet.managed_names() == {"local-1", "local-2"}


def test_workers_another_decider_started_since_the_count_are_not_started_twice(
        fleet, mint, tmp_path):
    """The launcher and Celery's tick both counted no worker, then took the lock in turn
    (the fleet ran 4 workers, above its maximum of 3)."""
    other = make_provider(tmp_path, mint)
    assert fleet.start_nodes(2, counted=0) == ["local-1", "local-2"]
    assert other.start_nodes(2, counted=0) == []
    assert other.start_nodes(3, counted=0) == ["local-3"]
    assert fleet.managed_names() == {"local-1", "local-2", "local-3"}


def test_the_join_token_is_never_on_a_workers_command_line(fleet, mint, monkeypatch):
    monkeypatch.setenv("SWARM_JOIN_TOKEN", "swj_the_launchers_own")  # not passed on
    fleet.start_nodes(1)
    assert token_of(fleet, "local-1") == "swj_test_local-1"
    [record] = fleet.records()
    assert "swj_" not in cmdline(record.pid)
    assert "--token" not in argv_of(fleet, "local-1")


def test_a_worker_with_stored_credentials_joins_without_a_new_token(fleet, mint):
    state_dir = node_state_dir(fleet.workers_dir / "local-1", "local-1")
    save_credentials(state_dir, NodeCredentials(portal_url=PORTAL_URL, node_id=7,
                                                node_secret="swn_7_x", replica_key="k"))
    assert fleet.start_nodes(1) == ["local-1"]
    assert token_of(fleet, "local-1") is None
    assert mint.names == []


def test_another_process_sees_the_fleet_and_forgets_a_worker_that_died(fleet, mint,
                                                                      tmp_path):
    fleet.start_nodes(1)
    other = make_provider(tmp_path, mint)
    assert other.managed_names() == {"local-1"}
    pid = other.records()[0].pid
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: other.managed_names() == set(), 10, "the dead worker to be forgotten")
    assert not other.state_path("local-1").exists()


def test_a_stopping_worker_keeps_its_name_but_is_not_managed(tmp_path, mint):
    provider = make_provider(tmp_path, mint, "--ignore-term")
    try:
        provider.start_nodes(1)
        argv_of(provider, "local-1")
        assert provider.stop_node("local-1")
        assert provider.managed_names() == set()
        # Its cache dir is still in use: a new worker must not take the same name.
        assert provider.start_nodes(1) == ["local-2"]
    finally:
        provider.stop_all(timeout_s=0.5)


def test_stop_all_kills_workers_that_ignore_sigterm_after_the_deadline(tmp_path, mint):
    provider = make_provider(tmp_path, mint, "--ignore-term")
    provider.start_nodes(2)
    for name in ("local-1", "local-2"):
        argv_of(provider, name)
    pids = {record.pid: record.start_ticks for record in provider.records()}
    provider.stop_all(timeout_s=0.5)
    assert not any(processes.is_alive(pid, ticks) for pid, ticks in pids.items())
    assert list(provider.fleet_dir.glob("*.json")) == []


def test_stop_all_also_stops_a_fleet_agent_that_has_no_state_file(fleet, tmp_path):
    """A start cut short (Celery killed) between spawning a worker and recording it."""
    command = fleet._command("local-9", "9500-9549")
    pid = processes.spawn_detached(command, tmp_path / "local-9.log", cwd=tmp_path,
                                   env=dict(os.environ))
    argv_of(fleet, "local-9")
    assert fleet.records() == []
    outsider = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                 "--cache-dir", str(tmp_path / "elsewhere")])
    try:
        fleet.stop_all(timeout_s=5)
        assert not processes.is_alive(pid)
        assert outsider.poll() is None  # not of this fleet
    finally:
        outsider.kill()
        outsider.wait()


def test_a_zombie_or_a_recycled_pid_counts_as_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        wait_until(lambda: processes.start_ticks(child.pid) is None, 10,
                   "the unreaped child to become a zombie")
        assert not processes.is_alive(child.pid)
    finally:
        child.wait()
    me = processes.start_ticks(os.getpid())
    assert me is not None
    assert processes.is_alive(os.getpid(), me)
    assert not processes.is_alive(os.getpid(), me + 1)


# -- the tick over real rows, with a recording provider -------------------------------


class RecordingProvider:
    """A provider that only records what it was asked to do."""

    name = "recording"

    def __init__(self, managed: set[str], bounds: NodeBounds) -> None:
        self.managed, self.bounds = managed, bounds
        self.started: list[int] = []
        self.stopped: list[str] = []

    def managed_names(self) -> set[str]:
        return set(self.managed)

    def start_nodes(self, count: int, *, counted: int | None = None) -> list[str]:
        self.started.append(count)
        return [f"new-{i}" for i in range(count)]

    def stop_node(self, name: str) -> bool:
        self.stopped.append(name)
        return True

    def stop_all(self, timeout_s: float) -> None:
        pass


def register(operator, name: str, cost: float = 0.0) -> Node:
    _token, secret = services.do_create_join_token(name="t", user=operator, expires_in=None,
                                                   uses=None)
    return Node.objects.get(pk=services.do_register_node(RegisterRequest(
        join_token=secret, name=name, address="127.0.0.1", cost_per_hour=cost,
        devices=[CPU])).node_id)


@pytest.mark.django_db
def test_the_tick_asks_for_a_node_when_a_replica_fits_nowhere(operator, model, model_files):
    factories.add_version(model, operator, model_files["torchscript"])
    services.do_create_deployment(name="mlp", model=model, version_number=1, alias_name="",
                                  user=operator, replicas=1)
    provider = RecordingProvider(set(), NodeBounds(min_nodes=0, max_nodes=3,
                                                   idle_release_s=60.0))
    plan = tick_nodes(provider=provider)
    assert provider.started == [1]
    assert plan.add == 1
    assert "started new-0" in plan.reason

    static = tick_nodes(provider=StaticProvider())
    assert static.unmet_nodes == 1
    assert "join GPU servers with a token" in static.reason


@pytest.mark.django_db
def test_the_tick_releases_an_idle_managed_node_beyond_the_minimum(operator):
    register(operator, "local-1", cost=1.0)
    register(operator, "local-2", cost=2.0)
    register(operator, "gpu-by-hand", cost=9.0)
    provider = RecordingProvider({"local-1", "local-2"},
                                 NodeBounds(min_nodes=1, max_nodes=3, idle_release_s=60.0))
    assert tick_nodes(provider=provider).release == ()  # just joined: not idle long enough
    later = timezone.now() + timedelta(seconds=120)
    plan = tick_nodes(later, provider=provider)
    assert plan.release == ("local-2",)
    assert provider.stopped == ["local-2"]


class FailingProvider(RecordingProvider):
    def start_nodes(self, count: int, *, counted: int | None = None) -> list[str]:
        raise ProviderError("no active admin account")


@pytest.mark.django_db
def test_a_provider_that_cannot_start_is_reported_not_raised(operator, model, model_files):
    factories.add_version(model, operator, model_files["torchscript"])
    services.do_create_deployment(name="mlp", model=model, version_number=1, alias_name="",
                                  user=operator, replicas=1)
    plan = tick_nodes(provider=FailingProvider(set(), NodeBounds(0, 3, 60.0)))
    assert plan.unmet_nodes == 1
    assert "failed: no active admin account" in plan.reason


def test_get_provider_follows_the_settings(settings, tmp_path):
    settings.SCALING_PROVIDER = "static"
    assert isinstance(get_provider(), StaticProvider)
    settings.SCALING_PROVIDER, settings.VAR_DIR = "local", tmp_path
    settings.LOCAL_FLEET_MIN_NODES, settings.LOCAL_FLEET_MAX_NODES = 2, 5
    settings.LOCAL_FLEET_BASE_PORT = 12000
    provider = get_provider()
    assert isinstance(provider, LocalProcessProvider)
    assert (provider.bounds.min_nodes, provider.bounds.max_nodes) == (2, 5)
    assert provider.fleet_dir == tmp_path / "local-fleet"
    assert provider.base_port == 12000


# -- real agents against a live portal -------------------------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_local_provider_runs_a_real_worker_that_joins_and_leaves(tmp_path, artifact_root):
    get_user_model().objects.create_superuser("root", password="pw-root")
    var_dir = tmp_path / "var"
    portal = LivePortal(free_port(), artifact_root, SWARM_VAR_DIR=str(var_dir),
                        HEARTBEAT_INTERVAL_S="1").start()
    provider = LocalProcessProvider(var_dir, portal.url, base_port=9400,
                                    agent_args=["--drain-grace-s", "5"])
    try:
        assert provider.start_nodes(1) == ["local-1"]
        node = wait_until(lambda: Node.objects.filter(name="local-1",
                                                      status=NodeStatus.READY).first(),
                          60, "local-1 to join")
        assert JoinToken.objects.get(name="local fleet: local-1").uses_left == 0
        assert "swj_" not in cmdline(provider.records()[0].pid)

        other = LocalProcessProvider(var_dir, portal.url)  # e.g. the launcher, elsewhere
        assert other.managed_names() == {"local-1"}
        pid = other.records()[0].pid
        assert other.stop_node("local-1")
        wait_until(lambda: not other.records() and not other.state_path("local-1").exists(),
                   60, "local-1 to drain, deregister and exit")
        assert not processes.is_alive(pid)
        assert Node.objects.get(pk=node.pk).status == NodeStatus.OFFLINE
        assert live_processes_mentioning(str(var_dir)) == []

        # Started again, it rejoins as the same node with its stored credentials.
        assert provider.start_nodes(1) == ["local-1"]
        wait_until(lambda: Node.objects.get(pk=node.pk).status == NodeStatus.READY, 60,
                   "local-1 to come back as the same node")
        assert JoinToken.objects.filter(name__startswith="local fleet").count() == 1
    finally:
        provider.stop_all(timeout_s=30)
        portal.stop()
    assert live_processes_mentioning(str(var_dir)) == []


def test_a_local_worker_is_told_to_leave_a_portal_that_is_gone_for_good(fleet):
    command = fleet._command("local-1", "9100-9149")
    flag = command.index("--portal-lost-exit-s")
    assert float(command[flag + 1]) > 60  # far beyond a restart or a Redis outage
