"""Replicas outlive their agent: a restarted agent adopts the ones it can verify.

Fake replica server processes (tests.agent_fakes) for the rules; at the end, the real
replica server under a real `swarm-worker` killed with SIGKILL, with a client sending
requests throughout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry.demo import DEMO_SIGNATURE, save_torchscript
from serving.agent import survivors
from serving.agent.replicas import ALIVE_FILE, ReplicaManager, ReplicaSettings
from swarm_protocol.agent_messages import DesiredReplica
from tests.agent_fakes import (
    FAKE_REPLICA_MODULE,
    JOIN_TOKEN,
    FakePortal,
    desired_replica,
    replica_key_of,
    worker_ports,
)
from tests.waiting import wait_until

KEY = "replica-key-of-node-1"
PORTS = worker_ports(range(19700, 19800))  # wide: a port in TIME_WAIT counts as taken
REPO_ROOT = Path(__file__).resolve().parent.parent
# Everything a replica may find in its environment (serving/agent/processes.py says why).
ALLOWED_NAMES = {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR",
                 "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                 "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS", "PYTHONPATH",
                 "SWARM_REPLICA_KEY", "SWARM_AGENT_PID", "SWARM_AGENT_ALIVE_FILE",
                 "SWARM_AGENT_WATCHDOG_S"}
ALLOWED_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "PYTORCH_CUDA_")


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(2)
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def managers(tmp_path: Path, executor: ThreadPoolExecutor) -> Iterator[list[ReplicaManager]]:
    """Managers over one replicas dir (one per agent run); every replica stopped at the end."""
    made: list[ReplicaManager] = []
    yield made
    for manager in reversed(made):
        manager.drain_all(time.monotonic())
        wait_until(lambda m=manager: not m.step(time.monotonic()) and m.live_count() == 0,
                   what="cleanup")
        manager.close()


def new_manager(tmp_path: Path, executor: ThreadPoolExecutor,
                made: list[ReplicaManager]) -> ReplicaManager:
    settings = ReplicaSettings(replicas_dir=tmp_path / "replicas", port_range=PORTS,
                               replica_module=FAKE_REPLICA_MODULE, drain_grace_s=10.0,
                               drain_delay_s=0.0)

    def prepare(desired: DesiredReplica) -> Path:
        path = tmp_path / f"artifact-{desired.replica_id}"
        path.write_text(desired.model_name)  # the fake reads its mode from the artifact
        return path

    manager = ReplicaManager(settings, prepare, executor)
    made.append(manager)
    return manager


def fake(replica_id: int, mode: str = "ready", **overrides: object) -> DesiredReplica:
    """Return a fake replica; it reads its mode (ready, never-ready, ...) from its artifact."""
    return desired_replica(replica_id, b"unused", model_name=mode, **overrides)


def start_ready(manager: ReplicaManager, *replica_ids: int) -> subprocess.Popen[bytes]:
    """Start these replicas (and stop any other); return the first one's process."""
    manager.reconcile([fake(replica_id) for replica_id in replica_ids], KEY, time.monotonic())

    def ready() -> bool:
        manager.step(time.monotonic())
        return all(manager.replicas[i].state == "ready" for i in replica_ids)
    wait_until(ready, what=f"replicas {replica_ids} ready")
    process = manager.replicas[replica_ids[0]].process
    assert isinstance(process, subprocess.Popen)
    return process


def step_until(manager: ReplicaManager, replica_id: int, state: str) -> None:
    def reached() -> bool:
        manager.step(time.monotonic())
        return manager.replicas[replica_id].state == state
    wait_until(reached, what=f"replica {replica_id} to be {state}")


def test_a_restarted_agent_adopts_its_healthy_replica_and_reports_it_ready(
        tmp_path: Path, executor: ThreadPoolExecutor, managers: list[ReplicaManager]) -> None:
    first = new_manager(tmp_path, executor, managers)
    process = start_ready(first, 9)
    port = first.replicas[9].port

    second = new_manager(tmp_path, executor, managers)  # the agent restarted
    assert second.adopt(KEY, time.monotonic()) == 1

    [status] = second.statuses()  # what the first heartbeat says
    assert (status.replica_id, status.state, status.port) == (9, "ready", port)
    assert second.replicas[9].process.pid == process.pid  # type: ignore[union-attr]
    second.reconcile([fake(9)], KEY, time.monotonic())  # the portal still wants it
    second.refresh_stats()
    assert second.replicas[9].state == "ready" and second.replicas[9].stats["completed"] == 7
    assert process.poll() is None

    second.reconcile([], KEY, time.monotonic())  # an adopted replica drains like any other
    step_until(second, 9, "stopped")
    assert process.wait(timeout=10) == 0  # drained on SIGTERM, not killed


@pytest.mark.parametrize("reply", ["not wanted", "other key", "other version"])
def test_the_first_reply_drains_an_adopted_replica_the_portal_wants_otherwise(
        tmp_path: Path, executor: ThreadPoolExecutor, managers: list[ReplicaManager],
        reply: str) -> None:
    process = start_ready(new_manager(tmp_path, executor, managers), 9)
    second = new_manager(tmp_path, executor, managers)
    second.adopt(KEY, time.monotonic())

    desired, key = {"not wanted": ([], KEY), "other key": ([fake(9)], "rotated-key-1234"),
                    "other version": ([fake(9, version=2)], KEY)}[reply]
    second.reconcile(desired, key, time.monotonic())

    assert second.replicas[9].state == "draining"
    step_until(second, 9, "stopped")
    assert process.wait(timeout=10) == 0
    if desired:  # once the old process is gone, the one the portal wants starts
        second.reconcile(desired, key, time.monotonic())
        step_until(second, 9, "ready")
        assert second.replicas[9].process.pid != process.pid  # type: ignore[union-attr]


def test_a_survivor_under_another_key_or_without_credentials_is_drained(
        tmp_path: Path, executor: ThreadPoolExecutor, managers: list[ReplicaManager]) -> None:
    first = new_manager(tmp_path, executor, managers)
    rotated = start_ready(first, 9, 10)
    no_credentials = first.replicas[10].process
    assert isinstance(no_credentials, subprocess.Popen)
    (tmp_path / "replicas" / "10" / survivors.RECORD_FILE).rename(tmp_path / "record-10")

    second = new_manager(tmp_path, executor, managers)
    assert second.adopt("another-key-for-node", time.monotonic()) == 0
    (tmp_path / "record-10").rename(tmp_path / "replicas" / "10" / survivors.RECORD_FILE)
    third = new_manager(tmp_path, executor, managers)
    assert third.adopt(None, time.monotonic()) == 0  # no credentials: no node to keep it for

    assert second.replicas[9].state == "draining" and third.replicas[10].state == "draining"
    assert rotated.wait(timeout=10) == 0 and no_credentials.wait(timeout=10) == 0


def test_a_survivor_still_loading_or_already_draining_carries_on_as_it_was(
        tmp_path: Path, executor: ThreadPoolExecutor, managers: list[ReplicaManager]) -> None:
    first = new_manager(tmp_path, executor, managers)
    first.reconcile([fake(9, "never-ready"), fake(10, "slow-drain")],
                    KEY, time.monotonic())
    wait_until(lambda: not first.step(time.monotonic())
               and first.replicas[10].state == "ready" and first.replicas[9].process,
               what="replica 10 ready, replica 9 launched")
    first.reconcile([fake(9, "never-ready")], KEY, time.monotonic())  # 10 drains
    draining = first.replicas[10].process
    assert first.replicas[10].signalled and draining is not None

    second = new_manager(tmp_path, executor, managers)
    second.adopt(KEY, time.monotonic())

    states = {status.replica_id: status.state for status in second.statuses()}
    assert states == {9: "starting", 10: "draining"}  # as the first heartbeat tells it
    assert second.replicas[10].signalled  # no second SIGTERM: that would stop it at once
    second.step(time.monotonic() + 60)  # past the drain grace: killed, as any replica is
    assert second.replicas[10].state == "stopped" and draining.wait(timeout=10) != 0


def test_a_recorded_pid_now_running_something_else_is_never_signalled(
        tmp_path: Path, executor: ThreadPoolExecutor, managers: list[ReplicaManager]) -> None:
    first = new_manager(tmp_path, executor, managers)
    replica = start_ready(first, 9)
    replica_dir = tmp_path / "replicas" / "9"
    record = survivors.read_record(replica_dir)
    assert record is not None and record.pid == replica.pid
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ticks = wait_until(lambda: survivors.start_ticks(bystander.pid), what="bystander")
        survivors.write_record(replica_dir, survivors.ReplicaRecord(
            **{**record.__dict__, "pid": bystander.pid, "start_ticks": ticks}))
        (tmp_path / "replicas" / "10").mkdir()  # a reused pid: same pid, other start time
        survivors.write_record(tmp_path / "replicas" / "10", survivors.ReplicaRecord(
            **{**record.__dict__, "replica_id": 10, "start_ticks": record.start_ticks + 1}))

        second = new_manager(tmp_path, executor, managers)
        assert second.adopt(KEY, time.monotonic()) == 0

        assert second.replicas == {}
        assert bystander.poll() is None and replica.poll() is None
        assert not (replica_dir / survivors.RECORD_FILE).exists()  # not looked at again
    finally:
        bystander.kill()
        bystander.wait()


def test_a_replica_sees_only_allow_listed_variables_and_no_secret(
        tmp_path: Path, executor: ThreadPoolExecutor, managers: list[ReplicaManager],
        monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = {"SECRET_KEY": "django-secret-value", "SWARM_JOIN_TOKEN": "swj_join_secret",
               "AWS_SECRET_ACCESS_KEY": "aws-secret-value", "DATABASE_URL": "postgres://u:pw@h/db",
               "LD_PRELOAD": "/tmp/evil.so"}
    for name, value in {**secrets, "CUDA_VISIBLE_DEVICES": "1", "OMP_NUM_THREADS": "2"}.items():
        monkeypatch.setenv(name, value)
    process = start_ready(new_manager(tmp_path, executor, managers), 9)

    environ = dict(item.split(b"=", 1) for item in
                   Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0") if item)
    names = {name.decode() for name in environ}
    assert {n for n in names if n not in ALLOWED_NAMES and not n.startswith(ALLOWED_PREFIXES)} \
        == set()
    assert not any(secret.encode() in value for secret in secrets.values()
                   for value in environ.values())
    assert environ[b"CUDA_VISIBLE_DEVICES"] == b"1" and environ[b"OMP_NUM_THREADS"] == b"2"
    assert environ[b"SWARM_REPLICA_KEY"] == KEY.encode()
    cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
    assert KEY.encode() not in cmdline  # `ps` shows the command line to every user
    record = (tmp_path / "replicas" / "9" / survivors.RECORD_FILE).read_text()
    assert KEY not in record  # the record keeps a hash of the key only


WATCHED = """
import signal, sys
from serving.replica.__main__ import start_watchdog
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
start_watchdog({"SWARM_AGENT_ALIVE_FILE": sys.argv[1], "SWARM_AGENT_WATCHDOG_S": "1"})
print("watching", flush=True)
while True:
    signal.pause()
"""


def test_a_replica_drains_itself_once_no_agent_touches_its_alive_file(tmp_path: Path) -> None:
    alive_file = tmp_path / ALIVE_FILE
    alive_file.touch()
    watched = subprocess.Popen([sys.executable, "-c", WATCHED, str(alive_file)], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE)
    try:
        assert watched.stdout is not None and watched.stdout.readline() == b"watching\n"
        kept_until = time.monotonic() + 3.0  # three watchdog periods, with an agent about
        while time.monotonic() < kept_until:
            os.utime(alive_file)
            assert watched.poll() is None, "drained although an agent was about"
            time.sleep(0.1)  # the agent's pace of touching, not a wait for a condition

        assert watched.wait(timeout=10) == 0  # the agent is gone: SIGTERM, drained
    finally:
        if watched.poll() is None:
            watched.send_signal(signal.SIGKILL)
            watched.wait()


# --- the real replica under a real worker agent, killed with SIGKILL ---------------------

REAL_PORTS = "19640-19659"
WATCHDOG_S = 12.0  # well past an agent restart, even on a loaded machine
INFER_BODY = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4],
                          "data": [0.1, 0.2, 0.3, 0.4]}]}


class ClientLoop:
    """Sends inference requests straight to one replica, one after another, counting."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {self.key}"}) as http:
            while not self._stop.is_set():
                try:
                    response = http.post(self.url, json=INFER_BODY)
                except httpx.HTTPError as error:
                    self.failures.append(repr(error))
                    continue
                if response.status_code == httpx.codes.OK:
                    self.ok += 1
                else:
                    self.failures.append(f"{response.status_code} {response.text[:200]}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def start_agent(portal: FakePortal, cache_dir: Path, log_path: Path,
                token: str | None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SWARM_JOIN_TOKEN", "DJANGO_SETTINGS_MODULE")}
    if token is not None:
        env["SWARM_JOIN_TOKEN"] = token
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "serving.agent", "--portal", portal.url, "--name",
             "adopt-box", "--cache-dir", str(cache_dir), "--port-range", REAL_PORTS,
             "--device-backend", "cpu", "--drain-grace-s", "20",
             "--replica-watchdog-s", f"{WATCHDOG_S:g}"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def node_heartbeats(portal: FakePortal) -> list[dict[str, Any]]:
    with portal.lock:
        return [body for node, body in portal.state.heartbeats if node == 1]


def kill_hard(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


@pytest.mark.slow
def test_a_killed_agent_restarts_and_adopts_its_serving_replica_with_no_failed_request(
        tmp_path: Path) -> None:
    artifact = save_torchscript(tmp_path / "demo.pt").read_bytes()
    cache_dir, log_path = tmp_path / "cache", tmp_path / "agent.log"
    agents: list[subprocess.Popen[bytes]] = []
    record: survivors.ReplicaRecord | None = None
    with FakePortal() as portal:
        portal.add_artifact(artifact)
        portal.state.desired[1] = [desired_replica(
            5, artifact, signature=DEMO_SIGNATURE, max_batch_size=4, max_queue_delay_ms=1.0)]
        try:
            agents.append(start_agent(portal, cache_dir, log_path, JOIN_TOKEN))
            wait_until(lambda: portal.replica_states(1).get(5) == "ready", timeout_s=180,
                       what="the replica ready under the first agent")
            port = portal.replica_status(1, 5)["port"]  # type: ignore[index]
            record = survivors.read_record(cache_dir / "nodes" / "adopt-box" / "replicas" / "5")
            assert record is not None and record.port == port
            client = ClientLoop(f"http://127.0.0.1:{port}/v2/models/demo-mlp/infer",
                                replica_key_of(1))
            wait_until(lambda: client.ok >= 5 or client.failures, what="requests served")

            kill_hard(agents[0])  # kill -9: no drain, no deregister
            served_at_kill, seen = client.ok, len(node_heartbeats(portal))
            agents.append(start_agent(portal, cache_dir, log_path, token=None))
            wait_until(lambda: len(node_heartbeats(portal)) > seen, timeout_s=60,
                       what="the restarted agent's first heartbeat")
            served_then = client.ok
            assert served_then > served_at_kill  # it served while no agent ran at all
            wait_until(lambda: client.ok >= served_then + 5 or client.failures,
                       what="requests served after the adoption")
            client.stop()

            first = node_heartbeats(portal)[seen]
            assert [(r["replica_id"], r["state"], r["port"]) for r in first["replicas"]] \
                == [(5, "ready", port)]  # the portal keeps routing to it
            assert client.failures == [], log_path.read_text()[-3000:]
            assert survivors.start_ticks(record.pid) == record.start_ticks  # the same process
            assert len(portal.state.registrations) == 1

            kill_hard(agents[1])  # and now nobody comes back: the watchdog drains it
            wait_until(lambda: survivors.start_ticks(record.pid) is None,  # type: ignore[union-attr]
                       timeout_s=WATCHDOG_S + 40, what="the orphaned replica to drain and exit")
        finally:
            for agent in agents:
                kill_hard(agent)
            if record is not None and survivors.start_ticks(record.pid) == record.start_ticks:
                os.killpg(record.pid, signal.SIGKILL)
