"""The auto-scaler end to end: real portal, Celery (beat ticking), local provider, replicas.

The local provider starts `swarm-worker` processes on this machine as the auto-scaler
asks; each replica needs more than half a node's memory here, so a second replica means
a second node. Load goes through `swarm-gateway` in front of the portal with an API key,
exactly as a client's would, and every response is checked.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest

from registry import services as registry_services
from scaling import services as scaling
from scaling.models import ScalingEvent
from scaling.providers import LocalProcessProvider
from serving import services
from serving.models import Deployment, Gpu, Node, NodeStatus, Replica, ReplicaState
from tests.conftest import free_port
from tests.e2e import LiveCelery, portal_env
from tests.live import LivePortal, wait_until
from tests.process_tree import live_processes_mentioning
from tests.replica_models import SLOW_SIGNATURE, build_slow_model, save_torchscript

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
SLOW_ITERATIONS = 300  # tens of milliseconds a request: a few clients keep several in flight
ROW = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                   "data": [0.5, -1.0, 2.0, 0.25]}]}


@pytest.fixture
def scaled_cluster(tmp_path: Path, artifact_root: Path, operator, admin_user):
    """A portal and Celery using the local provider (1..2 nodes); stops it all after."""
    var_dir = tmp_path / "var"
    base_port = free_port() // 100 * 100 % 50_000 + 10_000  # away from `make run`'s 9100
    port = free_port()
    env = {"HEARTBEAT_INTERVAL_S": "0.5", "MISSED_HEARTBEATS_OFFLINE": "6",
           "SWARM_VAR_DIR": str(var_dir), "SCALING_TICK_S": "1", "SCALING_PROVIDER": "local",
           "LOCAL_FLEET_MIN_NODES": "1", "LOCAL_FLEET_MAX_NODES": "2",
           "LOCAL_FLEET_BASE_PORT": str(base_port), "NODE_IDLE_RELEASE_S": "3",
           "LOCAL_FLEET_PORTAL_URL": f"http://127.0.0.1:{port}",
           "GATEWAY_HOLD_TIMEOUT_S": "60"}
    portal = LivePortal(port, artifact_root, gateway=True, **env)
    celery = LiveCelery(portal_env(artifact_root, var_dir, **env), var_dir)
    provider = LocalProcessProvider(var_dir, portal.url, base_port=base_port)
    try:  # everything below is stopped even when starting it failed halfway
        portal.start()
        celery.start()
        wait_until(lambda: Node.objects.filter(status=NodeStatus.READY).count() == 1, 90,
                   "the local provider's first node")
        yield portal, provider, _deployment(tmp_path, operator)
    finally:
        # Celery first: its auto-scaler would start a worker again to keep the minimum
        # (how two workers outlived a run, heartbeating a portal that was gone).
        celery.stop()
        provider.stop_all(timeout_s=40)
        portal.stop()
    assert live_processes_mentioning(str(var_dir)) == []


def _deployment(tmp_path: Path, operator) -> Deployment:
    """The slow model, needing 60% of a node's memory: one replica per node."""
    model = registry_services.do_create_model(name="slow", description="", owner=operator)
    staging = registry_services.artifact_store().stage()
    staging.write(save_torchscript(build_slow_model(SLOW_ITERATIONS),
                                   tmp_path / "slow.pt").read_bytes())
    registry_services.do_create_version(model=model, staging=staging,
                                        signature=SLOW_SIGNATURE, metadata={},
                                        declared_format=None, user=operator)
    node_memory = Gpu.objects.values_list("memory_total_bytes", flat=True).first()
    return services.do_create_deployment(
        name="slow", model=model, version_number=1, alias_name="", user=operator,
        replicas=1, memory_bytes=int(node_memory * 0.6), max_batch_size=4)


def ready(deployment: Deployment) -> list[Replica]:
    return list(Replica.objects.filter(deployment=deployment, desired=True,
                                       state=ReplicaState.READY))


class Clients:
    """Threads posting inference requests through the gateway; every outcome is kept."""

    def __init__(self, url: str, key: str, threads: int) -> None:
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(url, key))
                         for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, url: str, key: str) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=90) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(url, json=ROW)
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                self.statuses[response.status_code] += 1
                if response.status_code != 200:
                    self.failures.append(f"{response.status_code} {response.text}")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def _api_key(operator) -> str:
    _key, secret = services.do_create_api_key(name="e2e", user=operator, deployments=None,
                                              expires_in=None, rate_limit_rps=None)
    return secret


def test_a_burst_adds_a_node_and_a_replica_then_drains_back_with_no_failure(
        scaled_cluster, operator):
    portal, provider, deployment = scaled_cluster
    scaling.do_set_policy(deployment, min_replicas=1, max_replicas=2,
                          target_in_flight_per_replica=1.0, stable_window_s=10.0,
                          panic_window_s=2.0, scale_down_delay_s=3.0)
    key, url = _api_key(operator), f"{portal.url}/v2/models/slow/infer"
    wait_until(lambda: len(ready(deployment)) == 1, 120, "the first replica")
    # The gateway polls the portal: the new key and the replica reach it within a poll.
    wait_until(lambda: httpx.post(url, json=ROW, timeout=90, headers={
        "Authorization": f"Bearer {key}"}).status_code == 200, 30, "the gateway to serve")
    clients = Clients(url, key, threads=6)
    try:
        wait_until(lambda: ScalingEvent.objects.filter(to_replicas=2).exists(), 60,
                   "a scale-up decision")
        wait_until(lambda: len(provider.managed_names()) == 2, 60, "a second local node")
        wait_until(lambda: len({r.node_id for r in ready(deployment)}) == 2, 120,
                   "a second replica, on the second node")
        served = Counter(r.node_id for r in ready(deployment))
        assert len(served) == 2
    finally:
        clients.stop()
    wait_until(lambda: Deployment.objects.get(pk=deployment.pk).replicas == 1, 90,
               "the scale-down decision")
    wait_until(lambda: Replica.objects.filter(deployment=deployment).exclude(
        state__in=[ReplicaState.STOPPED]).filter(desired=False).count() == 0
        and len(ready(deployment)) == 1, 90, "the drained replica to stop")
    wait_until(lambda: len(provider.managed_names()) == 1, 90, "the idle node to be released")
    assert clients.failures == []
    assert clients.statuses[200] > 20
    up = ScalingEvent.objects.filter(to_replicas=2).first()
    assert up is not None and up.reason
    assert ScalingEvent.objects.filter(from_replicas=2, to_replicas=1).exists()


def test_a_request_at_zero_is_held_then_served_after_activation(scaled_cluster, operator):
    portal, _provider, deployment = scaled_cluster
    # Made before the wait: the gateway (its own process) learns of a new key within a
    # poll or two, not at once.
    key = _api_key(operator)
    scaling.do_set_policy(deployment, min_replicas=0, max_replicas=1, scale_to_zero=True,
                          idle_before_zero_s=1.0, target_in_flight_per_replica=1.0,
                          stable_window_s=4.0, panic_window_s=1.0, scale_down_delay_s=1.0)
    wait_until(lambda: Deployment.objects.get(pk=deployment.pk).replicas == 0
               and not Replica.objects.filter(deployment=deployment).exclude(
                   state__in=[ReplicaState.STOPPED, ReplicaState.FAILED]).exists(),
               90, "the idle deployment to reach zero")
    # The gateway's table too (it polls the portal): a replica still listed, draining,
    # would get the request instead of a hold.
    wait_until(lambda: 'replica_in_flight{model="slow"' not in httpx.get(
        f"{portal.url}/metrics", timeout=10).text, 10, "the gateway's table at zero")
    response = httpx.post(f"{portal.url}/v2/models/slow/infer", json=ROW, timeout=90,
                          headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [1, 4]
    cold_start = ScalingEvent.objects.filter(from_replicas=0).first()
    assert cold_start is not None and "held requests" in cold_start.reason
