"""The agent loop against a fake portal, running fake replica server processes."""

from __future__ import annotations

import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.agent import credentials as creds
from serving.agent.agent import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PORTAL_LOST,
    EXIT_REVOKED,
    Agent,
    AgentConfig,
)
from serving.agent.client import PortalClient
from serving.agent.devices import CpuBackend
from swarm_protocol.agent_messages import HEARTBEAT_PATH
from tests.agent_fakes import (
    FAKE_REPLICA_MODULE,
    JOIN_TOKEN,
    FakePortal,
    desired_replica,
    worker_ports,
)
from tests.waiting import wait_until

PORTS = worker_ports(range(19400, 19440))


@pytest.fixture
def portal() -> Iterator[FakePortal]:
    with FakePortal() as running:
        yield running


def make_agent(portal: FakePortal, tmp_path: Path, token: str | None = JOIN_TOKEN,
               **overrides: Any) -> Agent:
    values: dict[str, Any] = {"name": "box-1", "port_range": PORTS, "drain_grace_s": 10.0,
                              "replica_module": FAKE_REPLICA_MODULE, **overrides}
    config = AgentConfig(portal_url=portal.url, cache_dir=tmp_path / "cache", join_token=token,
                         **values)
    return Agent(config, CpuBackend())


class Running:
    """An agent's run() in a thread, and its exit code once it returns."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.exit_code: int | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.exit_code = self.agent.run()

    def stop(self, timeout_s: float = 30.0) -> int | None:
        self.agent.stop_requested.set()
        return self.wait(timeout_s)

    def wait(self, timeout_s: float = 30.0) -> int | None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the agent did not return"
        return self.exit_code


@pytest.fixture
def running_agents() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for running in started:
        running.stop()


def heartbeat_count(portal: FakePortal, node_id: int) -> int:
    with portal.lock:
        return sum(1 for node, _ in portal.state.heartbeats if node == node_id)


def test_the_agent_joins_once_and_a_restart_needs_no_token(portal: FakePortal,
                                                          tmp_path: Path) -> None:
    first = make_agent(portal, tmp_path, labels={"zone": "eu"}, cost_per_hour=2.5)
    joined = first.join()
    first.heartbeat(time.monotonic())
    first.shutdown(deregister=False)

    restarted = make_agent(portal, tmp_path, token=None)
    again = restarted.join()
    restarted.heartbeat(time.monotonic())
    restarted.shutdown(deregister=False)

    assert again == joined
    [registration] = portal.state.registrations
    assert (registration["name"], registration["labels"]) == ("box-1", {"zone": "eu"})
    assert registration["cost_per_hour"] == 2.5
    assert registration["devices"][0]["kind"] == "cpu"
    assert heartbeat_count(portal, joined.node_id) == 2
    stored = restarted.state_dir / creds.CREDENTIALS_FILE
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600


def test_without_token_or_credentials_the_agent_exits_with_an_error(
        portal: FakePortal, tmp_path: Path) -> None:
    assert make_agent(portal, tmp_path, token=None).run() == EXIT_FAILED
    assert portal.state.registrations == []


def test_a_refused_join_token_exits_with_an_error(portal: FakePortal, tmp_path: Path) -> None:
    assert make_agent(portal, tmp_path, token="not-the-token").run() == EXIT_FAILED


def test_revoked_credentials_without_a_token_stop_the_agent_nonzero(
        portal: FakePortal, tmp_path: Path) -> None:
    agent = make_agent(portal, tmp_path, token=None)
    portal.state.secrets["swn_7_known"] = 7
    creds.save_credentials(agent.state_dir, creds.NodeCredentials(
        portal_url=portal.url, node_id=7, node_secret="swn_7_known", replica_key="key-7"))
    running = Running(agent)
    wait_until(lambda: heartbeat_count(portal, 7), what="a heartbeat")

    portal.revoke(7)

    assert running.wait() == EXIT_REVOKED
    assert not (agent.state_dir / creds.CREDENTIALS_FILE).exists()
    assert portal.state.deregistered == []


def test_revoked_credentials_with_a_token_drain_the_old_replicas_and_register_again(
        portal: FakePortal, tmp_path: Path, running_agents: list[Running]) -> None:
    portal.add_artifact(b"ready")
    portal.state.desired[1] = [desired_replica(10, b"ready")]
    agent = make_agent(portal, tmp_path)
    running_agents.append(Running(agent))
    wait_until(lambda: portal.replica_states(1).get(10) == "ready", what="replica 10 ready")
    old_process = agent.replicas.replicas[10].process

    portal.revoke(1)

    wait_until(lambda: heartbeat_count(portal, 2), what="node 2's heartbeat")
    assert old_process is not None and old_process.returncode == 0  # drained, not killed
    assert portal.replica_states(2) == {}  # node 2 never reports node 1's replicas
    stored = creds.load_credentials(agent.state_dir, portal.url)
    assert stored is not None and stored.node_id == 2


def test_the_agent_runs_reports_and_drains_the_replicas_the_portal_wants(
        portal: FakePortal, tmp_path: Path) -> None:
    sha256 = portal.add_artifact(b"ready")  # the fake replica reads its mode from the artifact
    portal.state.desired[1] = [desired_replica(11, b"ready")]
    running = Running(make_agent(portal, tmp_path))

    ready = wait_until(lambda: (portal.replica_status(1, 11) or {}).get("state") == "ready"
                       and portal.replica_status(1, 11), what="replica 11 reported ready")
    assert ready["port"] in PORTS and ready["completed"] == 7
    assert portal.state.heartbeats[-1][1]["cached_artifacts"] == [sha256]

    portal.state.desired[1] = []
    wait_until(lambda: portal.replica_states(1).get(11) == "stopped",
               what="replica 11 reported stopped")
    wait_until(lambda: portal.replica_states(1) == {}, what="replica 11 forgotten")
    assert running.stop() == EXIT_OK
    assert portal.state.deregistered == [1]


def test_heartbeat_failures_are_retried_while_replicas_keep_running(
        portal: FakePortal, tmp_path: Path) -> None:
    portal.add_artifact(b"ready")
    portal.state.desired[1] = [desired_replica(12, b"ready")]
    agent = make_agent(portal, tmp_path)
    running = Running(agent)
    wait_until(lambda: portal.replica_states(1).get(12) == "ready", what="replica 12 ready")
    port = portal.replica_status(1, 12)["port"]  # type: ignore[index]

    portal.state.unavailable = True
    wait_until(lambda: agent.heartbeat_failures >= 3, what="three failed heartbeats")
    process = agent.replicas.replicas[12].process
    assert process is not None and process.poll() is None
    before = heartbeat_count(portal, 1)
    portal.state.unavailable = False

    wait_until(lambda: heartbeat_count(portal, 1) > before, what="heartbeats to resume")
    assert portal.replica_status(1, 12)["port"] == port  # type: ignore[index]
    assert running.stop() == EXIT_OK


def test_stopping_the_agent_drains_its_replicas_before_deregistering(
        portal: FakePortal, tmp_path: Path) -> None:
    portal.add_artifact(b"ready")
    portal.state.desired[1] = [desired_replica(13, b"ready")]
    agent = make_agent(portal, tmp_path)
    running = Running(agent)
    wait_until(lambda: portal.replica_states(1).get(13) == "ready", what="replica 13 ready")
    process = agent.replicas.replicas[13].process
    drained_marker = agent.state_dir / "replicas" / "13" / "drained"
    drained_at_deregister: list[bool] = []
    portal.on_deregister = lambda _node: drained_at_deregister.append(drained_marker.exists())

    assert running.stop() == EXIT_OK

    assert process is not None and process.returncode == 0  # drained, not killed
    assert drained_at_deregister == [True]
    states = [replica["state"] for _, body in portal.state.heartbeats
              for replica in body["replicas"]]
    assert states[-1] == "draining"  # the portal heard it was draining before the agent left


def test_step_heartbeats_when_due_and_early_when_a_replica_changes_state(
        portal: FakePortal, tmp_path: Path) -> None:
    portal.state.desired[1] = [desired_replica(40, b"not on the portal")]  # will fail: 404
    agent = make_agent(portal, tmp_path, heartbeat_interval_s=5.0)
    agent.join()

    agent.step(100.0)  # first step: heartbeat at once; its reply admits replica 40
    artifact = agent.replicas.replicas[40].artifact
    assert artifact is not None
    wait_until(artifact.done, what="the artifact fetch to fail")
    agent.step(100.1)  # replica 40 failed, but too soon after the last heartbeat to report
    assert heartbeat_count(portal, 1) == 1
    agent.step(100.3)  # reported early, not at 105.0
    assert heartbeat_count(portal, 1) == 2
    assert portal.replica_states(1) == {40: "failed"}
    agent.step(104.0)
    assert heartbeat_count(portal, 1) == 2
    agent.step(105.3)
    assert heartbeat_count(portal, 1) == 3
    agent.shutdown(deregister=False)


def test_two_agents_cannot_act_as_one_node_from_one_cache(portal: FakePortal,
                                                          tmp_path: Path) -> None:
    first = make_agent(portal, tmp_path)

    with pytest.raises(creds.NodeDirBusy, match="another agent is running"):
        make_agent(portal, tmp_path)
    other_name = make_agent(portal, tmp_path, name="box-2")  # shares the artifact cache
    first.shutdown(deregister=False)
    again = make_agent(portal, tmp_path)

    assert other_name.cache.artifacts_dir == again.cache.artifacts_dir
    other_name.shutdown(deregister=False)
    again.shutdown(deregister=False)


class TimingOutHeartbeats(httpx.HTTPTransport):
    """A real transport to the fake portal whose heartbeats time out while `slow` is set."""

    slow = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.slow and request.url.path == HEARTBEAT_PATH:
            raise httpx.ReadTimeout("the portal is busy", request=request)
        return super().handle_request(request)


@pytest.mark.parametrize("jitter", [0.0, 0.999])
def test_a_timed_out_or_refused_heartbeat_backs_off_with_jitter_and_keeps_replicas(
        portal: FakePortal, tmp_path: Path, jitter: float) -> None:
    portal.add_artifact(b"ready")
    portal.state.desired[1] = [desired_replica(14, b"ready")]
    transport = TimingOutHeartbeats()
    config = AgentConfig(portal_url=portal.url, cache_dir=tmp_path / "cache", name="box-1",
                         join_token=JOIN_TOKEN, port_range=PORTS, heartbeat_interval_s=1.0,
                         replica_module=FAKE_REPLICA_MODULE)
    agent = Agent(config, CpuBackend(), client=PortalClient(portal.url, transport=transport),
                  jitter=lambda: jitter)
    agent.join()
    # A fake replica process starts in well under a second, but not on a machine whose
    # other test worker keeps both cores busy: a generous deadline, not a longer wait.
    wait_until(lambda: agent.step(time.monotonic()) or portal.replica_states(1) == {14: "ready"},
               60, what="replica 14 reported ready")
    process = agent.replicas.replicas[14].process

    times_s = []
    for failures in range(1, 6):  # 1 s interval: backoffs 1, 2, 4, 8, 10 (the cap) seconds
        transport.slow = failures % 2 == 1  # alternately a time-out and a 503
        portal.state.unavailable = not transport.slow
        assert agent.heartbeat(1000.0) is None
        times_s.append(agent.next_heartbeat_s - 1000.0)

    ceilings_s = [1.0, 2.0, 4.0, 8.0, 10.0]
    expected_s = [max(1.0, c * (0.5 + 0.5 * jitter)) for c in ceilings_s]
    assert times_s == pytest.approx(expected_s)
    assert agent.heartbeat_failures == 5
    assert agent.replicas.replicas[14].state == "ready" and process is not None
    assert process.poll() is None  # nothing stopped while the portal was busy
    transport.slow = portal.state.unavailable = False
    assert agent.heartbeat(1001.0) is not None and agent.heartbeat_failures == 0
    assert portal.replica_states(1) == {14: "ready"}
    agent.shutdown(deregister=False)


def test_an_agent_told_to_leave_a_lost_portal_drains_and_exits(
        portal: FakePortal, tmp_path: Path) -> None:
    portal.add_artifact(b"ready")
    portal.state.desired[1] = [desired_replica(15, b"ready")]
    agent = make_agent(portal, tmp_path, heartbeat_interval_s=0.1, portal_lost_exit_s=1.0)
    running = Running(agent)
    wait_until(lambda: portal.replica_states(1).get(15) == "ready", what="replica 15 ready")
    process = agent.replicas.replicas[15].process
    assert process is not None

    portal.state.unavailable = True
    assert running.wait(timeout_s=30) == EXIT_PORTAL_LOST
    assert agent.heartbeat_failures >= 2  # it retried before giving up
    assert process.poll() is not None  # its replica was drained, not left running


def test_by_default_an_agent_never_leaves_a_busy_portal(portal: FakePortal,
                                                         tmp_path: Path) -> None:
    agent = make_agent(portal, tmp_path, heartbeat_interval_s=1.0)
    agent.join()
    portal.state.unavailable = True
    for now_s in (1000.0, 2000.0, 90000.0):  # a day of failures: still running
        assert agent.heartbeat(now_s) is None
    agent.shutdown(deregister=False)
