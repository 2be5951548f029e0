"""`make run`'s launcher supervises: what dies comes back, and nothing outlives it.

The fast tests drive `swarm_portal.supervisor` over small real processes; the slow one
runs the launcher itself on a fresh embedded default (its own directory and ports),
kills its Celery, its portal and a gateway, and stops it.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from scaling.providers import processes
from swarm_portal import broker
from swarm_portal.stopping import is_stopping
from swarm_portal.supervisor import Backoff, ChildSpec, Supervisor
from tests.conftest import free_port
from tests.process_tree import (
    children_of,
    cmdline,
    live_processes_mentioning,
    process_group_members,
)
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def spec(name: str, script: str, tmp_path: Path) -> ChildSpec:
    return ChildSpec(name, ["/bin/sh", "-c", script], tmp_path, dict(os.environ),
                     stop_timeout_s=5)


def test_the_back_off_doubles_up_to_its_cap():
    backoff = Backoff(first_s=0.5, factor=2.0, max_s=4.0)
    assert [backoff.delay_s(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_a_child_that_keeps_dying_comes_back_later_each_time_until_it_runs_a_while(
        tmp_path):
    clock = FakeClock()
    supervisor = Supervisor([spec("crasher", "exit 3", tmp_path)],
                            Backoff(first_s=0.5, factor=2.0, max_s=30.0, stable_s=10.0), clock)
    supervisor.start_all()
    child = supervisor.children["crasher"]
    delays = []
    for _ in range(3):
        wait_until(lambda: child.proc.poll() is not None, 10, "the child to exit")
        assert supervisor.step()  # the death is noticed; the restart waits
        delays.append(child.restart_at_s - clock.now_s)
        clock.now_s = child.restart_at_s - 0.01
        assert not supervisor.step()
        clock.now_s = child.restart_at_s
        assert supervisor.step()  # restarted
    assert delays == [0.5, 1.0, 2.0]
    assert child.restarts == 3
    wait_until(lambda: child.proc.poll() is not None, 10, "the child to exit")
    clock.now_s += 10.0  # it ran `stable_s`: the next restart is quick again
    supervisor.step()
    assert child.restart_at_s - clock.now_s == 0.5


@pytest.mark.parametrize(("cpus", "gateways"), [(None, 1), (1, 1), (2, 1), (3, 2), (64, 2)])
def test_make_run_leaves_a_core_to_the_replicas(cpus, gateways):
    from swarm_portal.launcher import default_gateway_processes

    assert default_gateway_processes(cpus) == gateways


def test_what_a_dead_child_started_is_killed_with_it(tmp_path):
    """A Celery pool process whose parent was killed must not stay connected."""
    pid_file = tmp_path / "grandchild.pid"
    supervisor = Supervisor([spec("parent", f"sleep 300 & echo $! > {pid_file}; wait",
                                  tmp_path)], Backoff(first_s=60.0))
    supervisor.start_all()
    leader = supervisor.children["parent"].pid
    grandchild = int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(),
                                10, "the grandchild's pid"))
    os.kill(leader, signal.SIGKILL)
    wait_until(supervisor.step, 10, "the supervisor to notice")
    wait_until(lambda: not processes.is_alive(grandchild), 10, "the grandchild to be killed")
    supervisor.stop(["parent"])


SUPERVISOR_SCRIPT = """
import os, sys, time
from pathlib import Path
from swarm_portal.supervisor import ChildSpec, Supervisor
supervisor = Supervisor([ChildSpec("sleeper", ["sleep", "300"], Path("."), dict(os.environ))])
supervisor.start_all()
print(supervisor.children["sleeper"].pid, flush=True)
time.sleep(300)
"""


def test_children_die_with_a_supervisor_killed_by_sigkill():
    parent = subprocess.Popen([sys.executable, "-c", SUPERVISOR_SCRIPT], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        sleeper = int(parent.stdout.readline())
        assert processes.is_alive(sleeper)
        parent.kill()
        parent.wait()
        wait_until(lambda: not processes.is_alive(sleeper), 10, "the orphan to get SIGTERM")
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


# -- the launcher itself ----------------------------------------------------------------

PORTAL_ONLY = ("DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE", "SWARM_JOIN_TOKEN")


def launcher_env(var_dir: Path, port: int) -> dict[str, str]:
    """The embedded default in `var_dir` on its own ports, as `make run` would start it."""
    env = {key: value for key, value in os.environ.items() if key not in PORTAL_ONLY}
    base_port = free_port() // 100 * 100 % 40_000 + 20_000  # away from `make run`'s 9100
    return {**env, "SWARM_VAR_DIR": str(var_dir), "SWARM_PORT": str(port),
            "LOCAL_FLEET_BASE_PORT": str(base_port), "LOCAL_FLEET_MIN_NODES": "1",
            "LOCAL_FLEET_MAX_NODES": "1", "SWARM_ADMIN_PASSWORD": "launcher-test-pw",
            "SWARM_GRPC_PORT": str(free_port()),
            "SWARM_GATEWAY_PROCESSES": "2"}  # a gateway is killed, the other serves


def child_running(launcher: subprocess.Popen[bytes], marker: str) -> int | None:
    """Return the pid of the launcher's child whose command line contains `marker`."""
    found = [pid for pid in children_of(launcher.pid) if marker in cmdline(pid)]
    return found[0] if len(found) == 1 else None


def delivered_since(broker_file: Path, since_id: int) -> int:
    """Return how many broker messages with an id above `since_id` were delivered."""
    try:
        with sqlite3.connect(broker_file, timeout=30) as db:
            return db.execute("SELECT count(*) FROM kombu_message WHERE visible = 0 AND "
                              "id > ?", (since_id,)).fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def last_message_id(broker_file: Path) -> int:
    with sqlite3.connect(broker_file, timeout=30) as db:
        return db.execute("SELECT coalesce(max(id), 0) FROM kombu_message").fetchone()[0]


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def v2_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.slow
def test_the_launcher_restarts_celery_the_portal_and_a_gateway_and_leaves_nothing_behind(
        tmp_path):
    var_dir, port = tmp_path / "var", free_port()
    url = f"http://127.0.0.1:{port}"
    broker_file = broker.broker_file(var_dir)
    launcher = subprocess.Popen([sys.executable, "-m", "swarm_portal.launcher"], cwd=ROOT,
                                env=launcher_env(var_dir, port))
    try:
        wait_until(lambda: healthy(url), 120, "the portal")
        celery = wait_until(lambda: child_running(launcher, "celery"), 30, "Celery")
        wait_until(lambda: delivered_since(broker_file, 0) >= 3, 60, "beat's first ticks")

        os.kill(celery, signal.SIGKILL)
        wait_until(lambda: not process_group_members(celery), 15,
                   "the killed Celery's pool processes to go with it")
        new_celery = wait_until(lambda: (pid := child_running(launcher, "celery"))
                                and pid != celery and pid, 30, "a new Celery")
        after = last_message_id(broker_file)
        wait_until(lambda: delivered_since(broker_file, after) >= 3, 60,
                   "beat ticking again, its tasks run")
        assert launcher.poll() is None

        portal = child_running(launcher, "uvicorn")
        os.kill(portal, signal.SIGTERM)
        wait_until(lambda: (pid := child_running(launcher, "uvicorn")) and pid != portal,
                   30, "a new portal process")
        wait_until(lambda: healthy(url), 60, "the restarted portal to serve")
        assert child_running(launcher, "celery") == new_celery

        # Two gateways serve the public port; one killed comes back, the other serves on.
        wait_until(lambda: v2_ready(url), 60, "the gateways' routing table")
        gateway = child_running(launcher, "make-run-gateway-1")
        assert gateway is not None and child_running(launcher, "make-run-gateway-2")
        os.kill(gateway, signal.SIGKILL)
        wait_until(lambda: healthy(url), 10, "the other gateway to serve")
        wait_until(lambda: (pid := child_running(launcher, "make-run-gateway-1"))
                   and pid != gateway, 30, "a new gateway process")
        wait_until(lambda: v2_ready(url), 60, "the gateways to serve /v2")
        assert launcher.poll() is None
    finally:
        launcher.send_signal(signal.SIGTERM)
        code = launcher.wait(timeout=120)
    assert code == 0
    assert is_stopping(var_dir)  # written before the workers left, for the portal to read
    # Everything the launcher started carries SWARM_VAR_DIR: portal, Celery and its pool,
    # the local workers and their replicas.
    wait_until(lambda: not live_processes_mentioning(str(var_dir), environment=True), 15,
               "every process of the launcher's tree to exit")


def launcher_db(var_dir: Path, query: str, *params: object) -> list[tuple]:
    """Rows from the launcher's own database (the embedded default's SQLite file)."""
    with sqlite3.connect(var_dir / "swarm.sqlite3", timeout=30) as db:
        return db.execute(query, params).fetchall()


def replicas_on(var_dir: Path, node_name: str) -> set[int]:
    return {row[0] for row in launcher_db(
        var_dir, "SELECT r.id FROM serving_replica r JOIN serving_node n ON r.node_id = n.id "
        "WHERE n.name = ? AND r.desired", node_name)}


def demo_settled(var_dir: Path) -> bool:
    """Every desired replica of every deployment is ready (nothing left to place)."""
    rows = launcher_db(var_dir, "SELECT d.replicas, (SELECT count(*) FROM serving_replica r "
                       "WHERE r.deployment_id = d.id AND r.desired AND r.state = 'ready') "
                       "FROM serving_deployment d")
    return bool(rows) and all(wanted == ready for wanted, ready in rows)


@pytest.mark.slow
def test_stopping_the_launcher_moves_no_replica_onto_an_external_worker(tmp_path):
    """Ctrl-C drained the local workers, and the portal re-placed their replicas on an
    external worker, which then outlived the portal serving them."""
    var_dir, port = tmp_path / "var", free_port()
    url = f"http://127.0.0.1:{port}"
    env = launcher_env(var_dir, port)
    launcher = subprocess.Popen([sys.executable, "-m", "swarm_portal.launcher"], cwd=ROOT,
                                env=env)
    external = None
    try:
        wait_until(lambda: healthy(url), 120, "the portal")
        wait_until(lambda: demo_settled(var_dir), 180, "the demo replicas on local-1")
        token = subprocess.run(
            [sys.executable, "-m", "swarm_portal.launcher", "manage", "local_join_token",
             "--uses", "1"], cwd=ROOT, env=env, check=True, capture_output=True,
            text=True).stdout.strip()
        first = free_port() // 100 * 100 % 30_000 + 30_000
        external = subprocess.Popen(
            [sys.executable, "-m", "serving.agent.cli", "--portal", url, "--name", "external",
             "--port-range", f"{first}-{first + 49}", "--cache-dir", str(tmp_path / "ext"),
             "--drain-grace-s", "5"], cwd=ROOT, start_new_session=True,
            env={**{k: v for k, v in env.items() if k != "SWARM_VAR_DIR"},
                 "SWARM_JOIN_TOKEN": token})
        wait_until(lambda: launcher_db(var_dir, "SELECT status FROM serving_node WHERE name = "
                                       "'external'") == [("ready",)], 60, "the external node")
        wait_until(lambda: demo_settled(var_dir), 60, "the deployments to settle again")
        before = replicas_on(var_dir, "external")
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=120) == 0
        assert replicas_on(var_dir, "external") <= before
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=120)
        if external is not None:
            external.send_signal(signal.SIGTERM)
            try:
                external.wait(timeout=60)
            except subprocess.TimeoutExpired:
                external.kill()
                external.wait()
