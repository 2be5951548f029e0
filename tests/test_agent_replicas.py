"""The replica process manager, driving fake replica server processes (tests.agent_fakes)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from serving.agent import processes
from serving.agent.cache import ArtifactCache
from serving.agent.client import PortalClient
from serving.agent.replicas import ReplicaManager, ReplicaSettings
from swarm_protocol.agent_messages import DesiredReplica
from tests.agent_fakes import (
    FAKE_REPLICA_MODULE,
    FakePortal,
    desired_replica,
    worker_ports,
)
from tests.waiting import wait_until

KEY = "replica-key-1"
PORTS = worker_ports(range(19300, 19340))


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(2)
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


def write_artifacts(root: Path) -> Callable[[DesiredReplica], Path]:
    """Return a prepare_artifact that writes the fake replica's mode as the artifact."""
    def prepare(desired: DesiredReplica) -> Path:
        path = root / f"artifact-{desired.replica_id}"
        path.write_text(desired.model_name)  # the fake reads its mode from the artifact
        return path
    return prepare


def make_manager(tmp_path: Path, executor: ThreadPoolExecutor,
                 prepare: Callable[[DesiredReplica], Path] | None = None,
                 drain_grace_s: float = 10.0, drain_delay_s: float = 0.0) -> ReplicaManager:
    config = ReplicaSettings(replicas_dir=tmp_path / "replicas", port_range=PORTS,
                             replica_module=FAKE_REPLICA_MODULE, drain_grace_s=drain_grace_s,
                             drain_delay_s=drain_delay_s)
    return ReplicaManager(config, prepare or write_artifacts(tmp_path), executor)


@pytest.fixture
def manager(tmp_path: Path, executor: ThreadPoolExecutor) -> Iterator[ReplicaManager]:
    created = make_manager(tmp_path, executor)
    yield created
    created.drain_all(time.monotonic())
    wait_until(lambda: not step(created) and created.live_count() == 0, what="cleanup")
    created.close()


def step(manager: ReplicaManager, now_s: float | None = None) -> bool:
    return manager.step(time.monotonic() if now_s is None else now_s)


def step_until_state(manager: ReplicaManager, replica_id: int, state: str) -> None:
    def reached() -> bool:
        step(manager)
        return manager.replicas[replica_id].state == state
    wait_until(reached, what=f"replica {replica_id} to be {state}")


def fake(replica_id: int, mode: str, **overrides: object) -> DesiredReplica:
    return desired_replica(replica_id, b"unused", model_name=mode, **overrides)


def test_a_replica_starts_becomes_ready_and_reports_its_stats(manager: ReplicaManager) -> None:
    manager.reconcile([fake(1, "ready", threads=3)], KEY, time.monotonic())
    assert manager.statuses()[0].state == "starting"

    step_until_state(manager, 1, "ready")
    manager.refresh_stats()

    [status] = manager.statuses()
    assert status.port in PORTS
    assert (status.in_flight, status.queue_depth, status.completed, status.failed) == (2, 1, 7, 1)
    assert (status.latency_p50_ms, status.latency_p99_ms) == (1.5, 9.25)
    launch = json.loads((manager.settings.replicas_dir / "1" / "launch.json").read_text())
    assert launch["key"] == KEY
    argv = launch["argv"]
    assert argv[argv.index("--threads") + 1] == "3"
    assert argv[argv.index("--port") + 1] == str(status.port)
    signature_file = Path(argv[argv.index("--signature-file") + 1])
    assert json.loads(signature_file.read_text())["inputs"][0]["name"] == "features"


def test_a_crashing_replica_is_failed_with_its_last_stderr_line(manager: ReplicaManager) -> None:
    manager.reconcile([fake(2, "crash")], KEY, time.monotonic())

    step_until_state(manager, 2, "failed")

    error = manager.statuses()[0].error
    assert "exited before it was ready (exit code 3)" in error
    assert error.endswith("RuntimeError: fake replica cannot load its model")


def test_a_replica_whose_port_was_taken_under_it_starts_again_on_another_port(
        manager: ReplicaManager) -> None:
    # The probe found the port free, but another program bound it before the replica did
    # (seen in CI): the agent starts it again on the next free port instead of failing it.
    manager.reconcile([fake(3, "port-taken-once")], KEY, time.monotonic())
    step_until_state(manager, 3, "starting")
    wait_until(lambda: (step(manager), manager.replicas[3].port_clashes == 1)[1],
               what="the relaunch after the port clash")
    step_until_state(manager, 3, "ready")
    [status] = manager.statuses()
    assert status.state == "ready" and status.error == ""
    assert (manager.settings.replicas_dir / "3" / "clashed").exists()  # it did clash first
    assert status.port in PORTS


def test_a_replica_not_ready_in_time_is_killed_and_failed(manager: ReplicaManager) -> None:
    manager.reconcile([fake(3, "never-ready")], KEY, time.monotonic())
    wait_until(lambda: step(manager) or manager.replicas[3].process is not None, what="launch")
    replica = manager.replicas[3]
    assert replica.launched_at_s is not None

    step(manager, replica.launched_at_s + manager.settings.ready_timeout_s + 1)

    assert replica.state == "failed"
    assert "not ready within 300s" in replica.error
    assert replica.process is not None and replica.process.returncode is not None


def test_a_ready_replica_that_dies_is_reported_failed(manager: ReplicaManager) -> None:
    manager.reconcile([fake(14, "ready")], KEY, time.monotonic())
    step_until_state(manager, 14, "ready")
    process = manager.replicas[14].process
    assert process is not None

    process.kill()

    step_until_state(manager, 14, "failed")
    error = manager.replicas[14].error
    assert error.startswith("replica process exited unexpectedly (exit code -9)")


def test_an_undesired_replica_drains_on_sigterm_then_is_forgotten(
        manager: ReplicaManager) -> None:
    manager.reconcile([fake(4, "ready")], KEY, time.monotonic())
    step_until_state(manager, 4, "ready")
    process = manager.replicas[4].process
    assert process is not None

    manager.reconcile([], KEY, time.monotonic())
    assert manager.statuses()[0].state == "draining"
    step_until_state(manager, 4, "stopped")

    assert process.returncode == 0  # it drained and exited by itself, no kill
    assert (manager.settings.replicas_dir / "4" / "drained").exists()
    manager.reconcile([], KEY, time.monotonic())
    assert manager.statuses() == []
    assert not (manager.settings.replicas_dir / "4").exists()  # its files went with it


def test_a_ready_replica_keeps_serving_through_the_drain_delay_before_its_sigterm(
        tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    manager = make_manager(tmp_path, executor, drain_delay_s=2.0)
    try:
        manager.reconcile([fake(6, "ready")], KEY, time.monotonic())
        step_until_state(manager, 6, "ready")
        process = manager.replicas[6].process
        assert process is not None
        started_s = time.monotonic()
        manager.reconcile([], KEY, started_s)
        assert manager.statuses()[0].state == "draining"  # the portal hears it at once
        step(manager, started_s + 1.9)
        assert process.poll() is None and not manager.replicas[6].signalled
        step(manager, started_s + 2.0)
        assert manager.replicas[6].signalled  # now told to stop
        step_until_state(manager, 6, "stopped")
        assert process.returncode == 0  # drained by its SIGTERM, not killed
    finally:
        manager.drain_all(time.monotonic())
        wait_until(lambda: not step(manager) and manager.live_count() == 0, what="cleanup")
        manager.close()


def test_a_replica_that_does_not_drain_is_killed_after_the_grace_period(
        manager: ReplicaManager) -> None:
    manager.reconcile([fake(5, "slow-drain")], KEY, time.monotonic())
    step_until_state(manager, 5, "ready")
    started_drain_s = time.monotonic()
    manager.reconcile([], KEY, started_drain_s)
    step(manager, started_drain_s + 1.0)
    assert manager.replicas[5].state == "draining"  # still within its grace period

    step(manager, started_drain_s + manager.settings.drain_grace_s + 0.1)

    replica = manager.replicas[5]
    assert replica.state == "stopped"
    assert "did not drain within 10s" in replica.error
    assert replica.process is not None and replica.process.returncode == -9


def test_an_artifact_that_fails_verification_fails_the_replica_without_starting_it(
        tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    artifact = b"the real model bytes"
    with FakePortal() as portal:
        portal.state.secrets["swn_1_t"] = 1
        sha256 = portal.add_artifact(artifact)
        portal.state.artifacts[sha256] = b"tampered bytes"
        cache = ArtifactCache(tmp_path / "cache",
                              PortalClient(portal.url, timeout_s=5.0, node_secret="swn_1_t"))
        manager = make_manager(tmp_path, executor,
                               prepare=lambda d: cache.ensure(d.sha256, d.size_bytes))

        manager.reconcile([desired_replica(6, artifact)], KEY, time.monotonic())
        step_until_state(manager, 6, "failed")

    replica = manager.replicas[6]
    assert replica.error.startswith(f"artifact not usable: artifact {sha256} downloaded with "
                                    "the wrong content")
    assert replica.process is None and replica.port is None
    assert cache.cached_sha256s() == []


def test_a_bad_signature_fails_the_replica_without_starting_it(manager: ReplicaManager) -> None:
    manager.reconcile([fake(7, "ready", signature={"inputs": []})], KEY, time.monotonic())

    step_until_state(manager, 7, "failed")

    assert "bad signature: " in manager.replicas[7].error
    assert manager.replicas[7].process is None


def test_a_replica_removed_while_its_artifact_downloads_is_stopped(
        tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    release = threading.Event()

    def slow_prepare(desired: DesiredReplica) -> Path:
        release.wait(10)
        return write_artifacts(tmp_path)(desired)

    manager = make_manager(tmp_path, executor, prepare=slow_prepare)
    manager.reconcile([fake(8, "ready")], KEY, time.monotonic())
    step(manager)

    manager.reconcile([], KEY, time.monotonic())
    release.set()
    step(manager)

    assert manager.replicas[8].state == "stopped"
    assert manager.replicas[8].process is None


def test_ports_are_handed_out_round_the_range_skipping_busy_ones() -> None:
    ports = range(19350, 19354)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 19351))
        busy.listen()

        first = processes.pick_port("127.0.0.1", ports, taken=[], after=None)
        second = processes.pick_port("127.0.0.1", ports, taken=[first], after=first)
        wrapped = processes.pick_port("127.0.0.1", ports, taken=[], after=19353)

    assert (first, second, wrapped) == (19350, 19352, 19350)
    with pytest.raises(RuntimeError, match="no free port in 19350-19353"):
        processes.pick_port("127.0.0.1", ports, taken=[19350, 19351, 19352, 19353], after=None)


def test_the_mean_in_flight_is_request_seconds_over_replica_seconds_between_polls():
    from serving.agent.replica_stats import mean_in_flight as _mean_in_flight

    first = {"clock_s": 100.0, "in_flight_seconds": 40.0}
    assert _mean_in_flight(None, first) is None  # nothing to compare yet
    assert _mean_in_flight((100.0, 40.0), {"clock_s": 102.0, "in_flight_seconds": 43.0}) == 1.5
    # A restarted replica (clock or counter went back) gives no figure rather than a wrong one.
    assert _mean_in_flight((100.0, 40.0), {"clock_s": 5.0, "in_flight_seconds": 1.0}) is None
    assert _mean_in_flight((100.0, 40.0), {"clock_s": 101.0}) is None
