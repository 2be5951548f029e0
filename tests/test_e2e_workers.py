"""End to end with real processes: the portal, Celery, two worker agents, replica servers.

Everything here is real: uvicorn serving the portal, a Celery worker with beat running
the node sweep, `swarm-worker` agents joining with a token, and replica processes
serving a TorchScript model over HTTP.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from knox.models import AuthToken

from registry.demo import build_mlp
from serving import services
from serving.models import Node, NodeStatus, Replica, ReplicaState
from serving.secrets import replica_key
from tests import factories
from tests.conftest import free_port
from tests.e2e import LiveAgent, LiveCelery, portal_env
from tests.live import LivePortal, wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
ROWS = [[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, 1.0, 1.0]]


@pytest.fixture
def cluster(tmp_path: Path, artifact_root: Path, operator):
    """A portal, Celery and two agents; yields what the tests need, stops it all after."""
    var_dir = tmp_path / "var"
    timing = {"HEARTBEAT_INTERVAL_S": "1", "MISSED_HEARTBEATS_OFFLINE": "3",
              "SWARM_VAR_DIR": str(var_dir)}
    portal = LivePortal(free_port(), artifact_root, **timing).start()
    celery = LiveCelery(portal_env(artifact_root, var_dir, **timing), var_dir).start()
    _token, secret = services.do_create_join_token(name="e2e", user=operator,
                                                   expires_in=None, uses=2)
    agents = [LiveAgent(portal.url, name, ports, tmp_path / name, secret).start()
              for name, ports in (("node-a", "9300-9319"), ("node-b", "9320-9339"))]
    try:
        yield {"portal": portal, "agents": agents, "operator": operator,
               "model_file": factories.torchscript_file(tmp_path)}
    finally:
        for agent in agents:
            agent.terminate(timeout_s=40)
        celery.stop()
        portal.stop()


def api_client(portal: LivePortal, user) -> httpx.Client:
    _, token = AuthToken.objects.create(user=user, expiry=None)
    return httpx.Client(base_url=portal.url, headers={"Authorization": f"Token {token}"},
                        timeout=30)


def ready_replicas(deployment: str) -> list[Replica]:
    return list(Replica.objects.filter(deployment__name=deployment, desired=True,
                                       state=ReplicaState.READY).select_related("node"))


def infer(replica: Replica, rows: list[list[float]]) -> httpx.Response:
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [len(rows), 4],
                        "data": rows}]}
    return httpx.post(f"http://{replica.node.address}:{replica.port}/v2/models/"
                      f"{replica.deployment.name}/infer", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {replica_key(replica.node_id)}"})


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def expected_scores(rows: list[list[float]]) -> np.ndarray:
    with torch.inference_mode():
        return build_mlp()(torch.tensor(rows)).numpy()


def test_two_agents_serve_a_deployment_and_a_crashed_node_loses_its_replica(cluster):
    portal, (agent_a, agent_b) = cluster["portal"], cluster["agents"]
    model = factories.make_model(cluster["operator"])
    factories.add_version(model, cluster["operator"], cluster["model_file"])
    api = api_client(portal, cluster["operator"])
    wait_until(lambda: Node.objects.filter(status=NodeStatus.READY).count() == 2, 60,
               "two nodes to join")
    nodes = api.get("/api/nodes/").json()["results"]
    assert all(node["live_devices"] and node["last_seen_s"] for node in nodes)
    first_seen = {node["id"]: node["last_seen_s"] for node in nodes}
    wait_until(lambda: all(n["last_seen_s"] > first_seen[n["id"]]
                           for n in api.get("/api/nodes/").json()["results"]), 10,
               "a second heartbeat from each node")

    created = api.post("/api/deployments/", json={"name": "mlp", "model": model.name,
                                                 "version": 1, "replicas": 2,
                                                 "memory_bytes": 64 * 1024**2})
    assert created.status_code == 201, created.text
    replicas = wait_until(lambda: len(ready_replicas("mlp")) == 2 and ready_replicas("mlp"),
                          120, "two ready replicas")
    assert len({r.node_id for r in replicas}) == 2, "replicas spread over both nodes"
    for replica in replicas:
        response = infer(replica, ROWS)
        assert response.status_code == 200, response.text
        scores = np.array(response.json()["outputs"][0]["data"]).reshape(2, 3)
        np.testing.assert_allclose(scores, expected_scores(ROWS), rtol=1e-5, atol=1e-6)
        unauthenticated = httpx.post(f"http://{replica.node.address}:{replica.port}/v2/models/"
                                     "mlp/infer", json={}, timeout=10)
        assert unauthenticated.status_code == 401

    crashed = Node.objects.get(name="node-a")
    orphan = next(r for r in replicas if r.node_id == crashed.pk)
    agent_a.kill()
    wait_until(lambda: not port_open(orphan.port), 30,
               "the killed agent's replica to exit (it follows its agent)")
    wait_until(lambda: Node.objects.get(pk=crashed.pk).status == NodeStatus.OFFLINE, 20,
               "the crashed node to be marked offline")
    moved = wait_until(
        lambda: (len(ready_replicas("mlp")) == 2
                 and all(r.node.name == "node-b" for r in ready_replicas("mlp"))
                 and ready_replicas("mlp")), 120, "the lost replica to start on node-b")
    assert infer(moved[0], ROWS).status_code == 200
    assert agent_b.proc.poll() is None


def test_sigterm_drains_an_agent_without_failing_in_flight_requests(cluster):
    portal, (agent_a, _agent_b) = cluster["portal"], cluster["agents"]
    model = factories.make_model(cluster["operator"])
    factories.add_version(model, cluster["operator"], cluster["model_file"])
    api = api_client(portal, cluster["operator"])
    wait_until(lambda: Node.objects.filter(status=NodeStatus.READY).count() == 2, 60,
               "two nodes to join")
    api.post("/api/deployments/", json={"name": "mlp", "model": model.name, "version": 1,
                                        "replicas": 2, "memory_bytes": 64 * 1024**2})
    wait_until(lambda: len(ready_replicas("mlp")) == 2, 120, "two ready replicas")
    target = next(r for r in ready_replicas("mlp") if r.node.name == "node-a")
    outcomes: list[str] = []
    stop = threading.Event()
    big_batch = ROWS * 4000  # a few ms of work per request, so some are in flight

    def load() -> None:
        while not stop.is_set():
            try:
                response = infer(target, big_batch)
                outcomes.append("ok" if response.status_code == 200 else
                                "refused" if response.status_code == 503 else
                                f"status {response.status_code}")
            except httpx.ConnectError:
                outcomes.append("refused")  # the replica is gone: nothing was in flight
            except httpx.RemoteProtocolError as exc:
                # A connection accepted as the server stops, before it read a request: the
                # server closes it unanswered (uvicorn only waits for requests it has begun),
                # so nothing ran; the gateway's pool retries these on another replica.
                unanswered = "without sending a response" in str(exc)
                outcomes.append("refused" if unanswered else f"broken: {exc!r}")
            except httpx.ReadError as exc:
                # The same stop, seen from the kernel: a server that closes a connection with
                # a request still unread in its receive buffer sends a reset, not a FIN.
                # uvicorn waits for every request it has begun, so this one was never read
                # (seen once in CI); like the case above, nothing ran.
                reset = isinstance(exc.__context__, ConnectionResetError) or \
                    "Connection reset by peer" in str(exc)
                outcomes.append("refused" if reset else f"broken: {exc!r}")
            except httpx.HTTPError as exc:
                outcomes.append(f"broken: {exc!r}")

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_until(lambda: outcomes.count("ok") >= 8, 30, "traffic to flow")
    exit_code = agent_a.terminate(timeout_s=60)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert exit_code == 0
    failures = [o for o in outcomes if o not in ("ok", "refused")]
    assert failures == [], failures
    assert Node.objects.get(name="node-a").status == NodeStatus.OFFLINE
    wait_until(lambda: len(ready_replicas("mlp")) == 2
               and all(r.node.name == "node-b" for r in ready_replicas("mlp")), 120,
               "the drained replica to be replaced on node-b")
