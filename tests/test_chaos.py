"""Chaos: `make run` under steady load loses no client request to any of four faults.

The real stack, started as a user starts it: the launcher (`python -m
swarm_portal.launcher`) on a directory and loopback ports of its own, with a Redis this
test starts, SQLite, and the local provider keeping two worker nodes; the demo
deployment pinned to two replicas. Client threads post inference requests through the
gateway all along, each on a new connection and never retried, so any refused
connection, reset, timeout or non-200 counts as a failure. One after another:

1. kill -9 one node's agent: the auto-scaler's provider starts it again, it adopts its
   replicas (the same replica ids stay ready), which served throughout;
2. stop Redis (SIGTERM) for a few seconds under load, then start it again, empty;
3. kill -9 the Celery process: the launcher restarts it, its ticks resume;
4. SIGTERM the portal's uvicorn: the launcher restarts it on the listening socket it
   holds, so clients wait in the kernel's backlog rather than being refused;
5. SIGTERM one of the two `swarm-gateway` processes serving the public port (one socket,
   held by the launcher, shared by both): the other serves meanwhile, the launcher
   restarts it.

After each, the test waits (deadline, no fixed sleep) for the desired state: two ready
replicas, two ready nodes, those hosting replicas heartbeating into the cache, and the
auto-scaler ticking again (the policy row's claimed tick moves). The figures go to
stdout; docs/reliability.md records them.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from scaling.providers import processes
from tests.chaos_helpers import (
    DEMO,
    ROOT,
    Launcher,
    Phase,
    RedisServer,
    SteadyLoad,
    infer_url,
    load_average,
    results,
)
from tests.conftest import free_port
from tests.process_tree import children_of, cmdline, live_processes_mentioning
from tests.waiting import wait_until

CLIENT_THREADS = 3
REQUEST_TIMEOUT_S = 30.0  # longer than a portal restart: a request waits, it is not lost
START_S = 180.0  # migrations, the demo model, two agents, two replicas, on 2 busy cores
RECOVERY_S = 60.0
REDIS_DOWN_S = 6.0  # how long Redis stays down under load
HEARTBEAT_FRESH_S = 5.0
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Launcher, RedisServer]]:
    """Redis and the launcher; stopped after (launcher first), leaving nothing behind."""
    redis = RedisServer(free_port(), tmp_path / "redis")
    base_port = free_port() // 100 * 100 % 30_000 + 30_000  # away from `make run`'s 9100
    launcher = Launcher(tmp_path / "var", free_port(), redis.url, base_port)
    try:
        redis.start()
        launcher.start()
        yield launcher, redis
    finally:
        code = launcher.stop()
        redis.stop()
    assert code == 0
    wait_until(lambda: not live_processes_mentioning(str(launcher.var_dir), environment=True),
               20, "every process the launcher started to exit")


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def ready_replicas(api: httpx.Client) -> dict[int, str]:
    """Return the demo's desired ready replicas: id -> node name."""
    rows = results(api.get("/api/replicas/", params={"deployment": DEMO, "limit": 100}).json())
    return {row["id"]: row["node_name"] for row in rows
            if row["desired"] and row["state"] == "ready"}


def desired_state(api: httpx.Client, heard_since_s: float = 0.0) -> dict[int, str] | None:
    """Return the ready replicas if the system is as wanted, else None: the two pinned
    replicas ready, the fleet's two nodes ready, and every node that hosts a replica heard
    from lately and after `heard_since_s` (unix time; its heartbeat is in the cache)."""
    try:
        replicas = ready_replicas(api)
        nodes = results(api.get("/api/nodes/", params={"limit": 100}).json())
    except (httpx.HTTPError, ValueError):  # the portal is restarting
        return None
    ready = {node["name"]: node for node in nodes if node["status"] == "ready"}
    # `last_seen_s` is the unix time of the last heartbeat in the cache (None: none there).
    fresh = {name for name, node in ready.items() if node["last_seen_s"] is not None
             and node["last_seen_s"] > max(heard_since_s, time.time() - HEARTBEAT_FRESH_S)}
    if len(replicas) == 2 and len(ready) == 2 and set(replicas.values()) <= fresh:
        return replicas
    return None


def describe(api: httpx.Client) -> str:
    """Return what the API says of the replicas and nodes (for a failure message)."""
    try:
        replicas = results(api.get("/api/replicas/", params={"deployment": DEMO}).json())
        nodes = results(api.get("/api/nodes/").json())
    except (httpx.HTTPError, ValueError) as exc:
        return f"the API did not answer: {exc!r}"
    return (f"replicas {[(r['id'], r['node_name'], r['state'], r['desired']) for r in replicas]}"
            f" nodes {[(n['name'], n['status'], n['last_seen_s']) for n in nodes]}")


def recover(launcher: Launcher, api: httpx.Client, phase: Phase, fault_at_s: float,
            also: Callable[[], bool] = lambda: True) -> dict[int, str]:
    """Wait for the desired state, heartbeats and a tick after the fault; record the time."""
    tick, fault_at_unix_s = launcher.last_tick(), time.time() - (time.monotonic() - fault_at_s)
    try:
        replicas = wait_until(
            lambda: also() and launcher.last_tick() > tick
            and desired_state(api, heard_since_s=fault_at_unix_s),
            RECOVERY_S, f"the desired state again after {phase.name}", interval_s=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; tick {launcher.last_tick()} (was {tick}); "
                             f"{describe(api)}") from None
    phase.recovery_s = time.monotonic() - fault_at_s
    phase.load_average = load_average()
    return replicas


def signal_and_recover(launcher: Launcher, api: httpx.Client, phase: Phase,
                       find_pid: Callable[[], int | None], sig: int) -> dict[int, str]:
    """Send `sig` to the process `find_pid()` names, then wait for another process in its
    place (`find_pid()` a new pid) and the desired state; return the ready replicas."""
    pid = find_pid()
    assert pid is not None, f"nothing to signal for {phase.name}"
    fault_at_s = time.monotonic()
    os.kill(pid, sig)
    return recover(launcher, api, phase, fault_at_s,
                   also=lambda: find_pid() not in (None, pid))


def kill_an_agent(launcher: Launcher, api: httpx.Client, load: SteadyLoad) -> None:
    phase = load.begin("kill -9 an agent")
    before = desired_state(api)
    assert before is not None
    # The node with the most replicas (the demo's two often land on the first to join).
    node = max(sorted(set(before.values())), key=list(before.values()).count)
    after = signal_and_recover(launcher, api, phase, lambda: launcher.agent_pid(node),
                               signal.SIGKILL)
    # Adopted, not replaced: the very replicas that served before are the ready ones.
    assert after == before


def stop_and_restart_redis(launcher: Launcher, api: httpx.Client, load: SteadyLoad,
                           redis: RedisServer) -> None:
    phase = load.begin("Redis stopped, restarted empty")
    fault_at_s = time.monotonic()
    redis.stop()
    wait_until(lambda: time.monotonic() - fault_at_s >= REDIS_DOWN_S and phase.sent >= 10,
               REDIS_DOWN_S + 30, "clients to send requests while Redis is down")
    redis.start()
    recover(launcher, api, phase, fault_at_s)


# (phase name, a word in the launcher child's command line, the signal): the launcher
# restarts each; `swarm-gateway --instance-id make-run-gateway-1` is one of the two gateways.
CHILD_FAULTS = (("kill -9 Celery", "celery", signal.SIGKILL),
                ("SIGTERM the portal (uvicorn)", "uvicorn", signal.SIGTERM),
                ("SIGTERM a gateway", "make-run-gateway-1", signal.SIGTERM))


def signal_a_child(launcher: Launcher, api: httpx.Client, load: SteadyLoad, name: str,
                   marker: str, sig: int) -> None:
    """Signal the launcher's child whose command line has `marker`; wait for its successor."""
    signal_and_recover(launcher, api, load.begin(name), lambda: launcher.child(marker), sig)


def report(phases: list[Phase]) -> str:
    lines = [f"load average {load_average()}"]
    for phase in phases:
        recovery = "-" if phase.recovery_s is None else f"{phase.recovery_s:.1f} s"
        lines.append(f"{phase.name}: sent {phase.sent}, failed {phase.failed}, "
                     f"slowest {phase.slowest_s:.2f} s, recovered in {recovery}, "
                     f"load average {phase.load_average or '-'}")
        lines += [f"    {failure}" for failure in phase.failures]
    return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_no_client_request_fails_through_agent_redis_celery_portal_and_gateway_faults(stack):
    launcher, redis = stack
    wait_until(lambda: healthy(launcher.url), START_S, "the portal")
    token = launcher.manage("create_api_token", "admin", "--days", "1")
    key = launcher.manage("create_api_key", "--name", "chaos")
    api = httpx.Client(base_url=launcher.url, timeout=30,
                       headers={"Authorization": f"Token {token}"})
    # Pinned: an idle-ish demo would be scaled to one replica during the test.
    pinned = api.patch(f"/api/deployments/{DEMO}/policy/",
                       json={"min_replicas": 2, "max_replicas": 2})
    assert pinned.status_code == 200, pinned.text
    try:
        wait_until(lambda: desired_state(api), START_S, "two ready replicas, two ready nodes",
                   interval_s=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {describe(api)}") from None
    load = SteadyLoad(infer_url(launcher.url), {"Authorization": f"Bearer {key}"},
                      CLIENT_THREADS, REQUEST_TIMEOUT_S).start()
    try:
        wait_until(lambda: load.current.sent >= 30, 60, "the warm-up requests")
        kill_an_agent(launcher, api, load)
        stop_and_restart_redis(launcher, api, load, redis)
        for name, marker, sig in CHILD_FAULTS:
            signal_a_child(launcher, api, load, name, marker, sig)
        load.begin("after")
        wait_until(lambda: load.current.sent >= 10, 60, "requests after the last fault")
    finally:
        load.stop()
        api.close()
        print(report(load.phases))
    assert [(phase.name, phase.failed, phase.failures) for phase in load.phases
            if phase.failed] == []
    assert all(phase.sent > 0 for phase in load.phases)


# -- the mechanism the portal's restart relies on, alone ---------------------------------

SUPERVISED_PORTAL = """
import os, sys, time
from pathlib import Path
from swarm_portal.launcher import listen
from swarm_portal.supervisor import ChildSpec, Supervisor
listener = listen("127.0.0.1", 0)
fd = listener.fileno()
command = [sys.executable, "-m", "swarm_portal.uvicorn_serve", "--fd", str(fd),
           "--app", "tests.chaos_helpers:ok_app"]
supervisor = Supervisor([ChildSpec("portal", command, Path("."), dict(os.environ),
                                   stop_timeout_s=15, pass_fds=(fd,))])
supervisor.start_all()
print(listener.getsockname()[1], flush=True)
while True:
    supervisor.step()
    time.sleep(0.05)
"""


def serving_child(parent: subprocess.Popen[str]) -> int | None:
    found = [pid for pid in children_of(parent.pid) if "uvicorn_serve" in cmdline(pid)]
    return found[0] if len(found) == 1 else None


def restart_under_load(parent: subprocess.Popen[str], load: SteadyLoad, name: str) -> None:
    phase = load.begin(name)
    server = serving_child(parent)
    assert server is not None
    os.kill(server, signal.SIGTERM)
    wait_until(lambda: serving_child(parent) not in (None, server) and phase.sent >= 100, 60,
               f"a new server, and requests to it ({name})")


@pytest.mark.slow
def test_sigterm_to_a_portal_on_the_supervisors_socket_loses_no_request():
    """Three restarts under load: no connection refused, none closed unanswered."""
    parent = subprocess.Popen([sys.executable, "-c", SUPERVISED_PORTAL], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    load, server = None, None
    try:
        url = f"http://127.0.0.1:{int(parent.stdout.readline())}/"
        wait_until(lambda: healthy(url.rstrip("/")), 60, "the first server")
        load = SteadyLoad(url, {}, CLIENT_THREADS + 1, REQUEST_TIMEOUT_S).start()
        wait_until(lambda: load.current.sent >= 100, 30, "requests before the restarts")
        for restart in range(1, 4):
            restart_under_load(parent, load, f"restart {restart}")
    finally:
        if load is not None:
            load.stop()
        server = serving_child(parent)
        parent.kill()  # its child gets SIGTERM from the kernel (PR_SET_PDEATHSIG)
        parent.wait()
        parent.stdout.close()
    if server is not None:
        wait_until(lambda: not processes.is_alive(server), 20, "the server to exit")
    assert [(phase.name, phase.failed, phase.failures) for phase in load.phases
            if phase.failed] == []
