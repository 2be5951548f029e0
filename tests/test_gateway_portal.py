"""The gateway on the database's routing table: real replicas, the real heartbeat path.

The gateway runs in this process (on a real socket) with DatabaseTableSource, so every
database query it makes can be counted; replicas are real processes; their readiness
reaches the portal through do_heartbeat, as an agent's would.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from django.db.backends.signals import connection_created
from django.test import Client

from registry import services as registry_services
from serving import services
from serving.gateway.app import GatewayApp
from serving.gateway_source import DatabaseTableSource, PortalSessionAuth
from serving.models import Node, Replica
from serving.secrets import replica_key
from swarm_protocol.agent_messages import (
    DeviceInfo,
    HeartbeatRequest,
    RegisterRequest,
    ReplicaStatus,
)
from tests.factories import DEMO_SIGNATURE, add_version
from tests.gateway_helpers import GatewayThread
from tests.live import wait_until
from tests.replica_models import REPO_ROOT, ReplicaProcess, free_port, replica_command

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
CPU = DeviceInfo(index=0, kind="cpu", name="cpu", uuid="cpu-0",
                 memory_total_bytes=64 * 1024**3, memory_used_bytes=0, utilization_pct=1.0)
DRAIN_DELAY_S = 2.0  # the agent's default --drain-delay-s
ROW = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4],
                   "data": [0.1, 0.2, 0.3, 0.4]}]}


class Agent:
    """Plays a worker agent for one node: owns replica processes, reports them ready."""

    def __init__(self, node: Node, directory: Path, artifacts: dict[int, Path]) -> None:
        self.node, self.directory, self.artifacts = node, directory, artifacts
        self.processes: dict[int, ReplicaProcess] = {}  # replica id -> process
        self.stopped: set[int] = set()
        self.retiring: dict[int, float] = {}  # replica id -> when the portal let it go

    def _start(self, replica_id: int, version: int) -> ReplicaProcess:
        signature = self.directory / "signature.json"
        signature.write_text(__import__("json").dumps(DEMO_SIGNATURE))
        port = free_port()
        stderr_path = self.directory / f"replica-{replica_id}.stderr"
        env = {**os.environ, "SWARM_REPLICA_KEY": replica_key(self.node.pk)}
        with stderr_path.open("w") as stderr:
            process = subprocess.Popen(
                replica_command(self.artifacts[version], "torchscript", signature, port,
                                name="mlp", version=version, max_batch_size=8),
                cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        return ReplicaProcess(process, port, stderr_path)

    def heartbeat(self) -> set[int]:
        """Start what the portal wants, stop the rest, report the ready ones; return them."""
        reply = services.do_heartbeat(self.node, HeartbeatRequest(replicas=self._statuses(),
                                                                  devices=[CPU]))
        wanted = {d.replica_id: d.version for d in reply.desired}
        for replica_id, version in wanted.items():
            if replica_id not in self.processes:
                self.processes[replica_id] = self._start(replica_id, version)
        now_s = time.monotonic()
        for replica_id in set(self.processes) - set(wanted) - self.stopped:
            # As the real agent does: reported draining at once, stopped after a pause in
            # which the gateways reload their tables and send it nothing new.
            since_s = self.retiring.setdefault(replica_id, now_s)
            if now_s - since_s >= DRAIN_DELAY_S:
                self.processes[replica_id].stop()  # drains: in-flight requests finish
                self.stopped.add(replica_id)
        reported = self._statuses()
        services.do_heartbeat(self.node, HeartbeatRequest(devices=[CPU], replicas=reported))
        return {status.replica_id for status in reported if status.state == "ready"}

    def _statuses(self) -> list[ReplicaStatus]:
        return [ReplicaStatus(replica_id=rid, port=p.port,
                              state="draining" if rid in self.retiring else "ready")
                for rid, p in self.processes.items()
                if rid not in self.stopped and _ready(p, self.node.pk)]

    def settle(self, count: int) -> None:
        """Heartbeat until `count` replicas are ready."""
        def done() -> bool:
            # What the portal was told, not a fresh look: a health check that timed out in
            # the report but answered just after would leave the portal a step behind.
            ready = self.heartbeat()
            live = set(self.processes) - self.stopped - set(self.retiring)
            return len(live) == count and ready == live
        wait_until(done, 90, f"{count} ready replicas", interval_s=0.3)

    def close(self) -> None:
        for process in self.processes.values():
            process.stop()


def _ready(process: ReplicaProcess, node_id: int) -> bool:
    try:
        return httpx.get(f"{process.url}/v2/health/ready", timeout=1, headers={
            "Authorization": f"Bearer {replica_key(node_id)}"}).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def portal_fleet(operator, model, model_files, tmp_path):
    add_version(model, operator, model_files["torchscript"])
    add_version(model, operator, model_files["torchscript_b"])
    _token, secret = services.do_create_join_token(name="t", user=operator, expires_in=None,
                                                   uses=None)
    node = Node.objects.get(pk=services.do_register_node(RegisterRequest(
        join_token=secret, name="n", address="127.0.0.1", cost_per_hour=1.0,
        devices=[CPU])).node_id)
    agent = Agent(node, tmp_path, {1: model_files["torchscript"],
                                   2: model_files["torchscript_b"]})
    _key, key = services.do_create_api_key(name="c", user=operator, deployments=None,
                                           expires_in=None, rate_limit_rps=None)
    app = GatewayApp(DatabaseTableSource(), PortalSessionAuth(), full_reload_s=3600.0)
    try:
        with GatewayThread(app) as gateway:
            client = httpx.Client(base_url=gateway.url, timeout=30,
                                  headers={"Authorization": f"Bearer {key}"})
            yield {"agent": agent, "client": client, "app": app, "model": model,
                   "operator": operator}
    finally:
        agent.close()


def served_versions(client: httpx.Client, count: int, path: str = "/v2/models/mlp/infer"
                    ) -> Counter[str]:
    versions: Counter[str] = Counter()
    for _ in range(count):
        response = client.post(path, json=ROW)
        assert response.status_code == 200, response.text
        versions[response.json()["model_version"]] += 1
    return versions


def test_requests_make_no_database_query_and_a_new_replica_gets_traffic_within_a_second(
        portal_fleet):
    agent, client, model = portal_fleet["agent"], portal_fleet["client"], portal_fleet["model"]
    deployment = services.do_create_deployment(name="mlp", model=model, version_number=1,
                                               alias_name="", user=portal_fleet["operator"],
                                               replicas=1)
    agent.settle(1)
    wait_until(lambda: client.post("/v2/models/mlp/infer", json=ROW).status_code == 200, 5,
               "the gateway to route to the first replica")
    queries: list[str] = []

    def count(execute, sql, params, many, context):
        queries.append(sql)
        return execute(sql, params, many, context)

    def watch(sender, connection, **kwargs) -> None:
        connection.execute_wrappers.append(count)

    connection_created.connect(watch)
    try:
        assert served_versions(client, 100) == {"1": 100}
        # The background report (at most once a second, never per request) may set the
        # keys' last_used_at meanwhile: those are the only queries allowed.
        on_path = [sql for sql in queries if "last_used_at" not in sql]
        assert on_path == [], f"{len(on_path)} queries on the request path: {on_path}"
    finally:
        connection_created.disconnect(watch)

    services.do_scale_deployment(deployment, 2)
    first = set(agent.processes)
    wait_until(lambda: (agent.heartbeat() or True) and len(agent.processes) == 2, 30,
               "a second replica process")
    [new_id] = set(agent.processes) - first
    new = agent.processes[new_id]
    wait_until(lambda: _ready(new, agent.node.pk), 60, "the new replica to load")
    agent.heartbeat()  # reports it ready: the portal bumps the routes revision now
    became_ready = time.monotonic()

    def reached_new() -> bool:
        client.post("/v2/models/mlp/infer", json=ROW)
        stats = httpx.get(f"{new.url}/stats", timeout=2, headers={
            "Authorization": f"Bearer {replica_key(agent.node.pk)}"}).json()
        return stats["completed"] > 0

    wait_until(reached_new, 5, "traffic on the new replica", interval_s=0.02)
    assert time.monotonic() - became_ready < 1.0


def test_a_logged_in_portal_user_may_call_deployments(portal_fleet):
    agent, model = portal_fleet["agent"], portal_fleet["model"]
    services.do_create_deployment(name="mlp", model=model, version_number=1, alias_name="",
                                  user=portal_fleet["operator"], replicas=1)
    agent.settle(1)
    browser = Client()
    browser.force_login(portal_fleet["operator"])
    url = f"{portal_fleet['client'].base_url}/v2/models/mlp/infer"
    session = {"sessionid": browser.cookies["sessionid"].value}
    outcomes: list[str] = []

    def accepted() -> bool:
        response = httpx.post(url, json=ROW, cookies=session)
        outcomes.append(f"{response.status_code} {response.text[:80]}")
        return response.status_code == 200

    assert wait_until(accepted, 10, "a session to be accepted"), outcomes
    assert httpx.post(url, json=ROW, cookies={"sessionid": "not-a-session"}).status_code == 401
    assert httpx.post(url, json=ROW).status_code == 401


def test_canary_weights_pinning_rollback_and_revocation(portal_fleet, operator):
    agent, client, model = portal_fleet["agent"], portal_fleet["client"], portal_fleet["model"]
    deployment = services.do_create_deployment(name="mlp", model=model, version_number=1,
                                               alias_name="", user=operator, replicas=3)
    services.do_update_deployment(deployment, {"traffic": {"1": 3, "2": 1}}, operator)
    agent.settle(3)
    app = portal_fleet["app"]
    served_versions(client, 1)  # the gateway loads its first table on its first request

    def both_weighted() -> bool:
        route = app.table.deployments.get("mlp")
        return route is not None and all(route.weights.get(v, 0) > 0 for v in (1, 2))

    # Both versions ready in the gateway's table: the split applies from then on.
    try:
        wait_until(both_weighted, 10, "both versions to take traffic in the gateway's table")
    except AssertionError as exc:
        rows = list(Replica.objects.values_list("pk", "version__number", "state", "desired",
                                                "port"))
        raise AssertionError(f"{exc}; the route now: {app.table.deployments.get('mlp')}; "
                             f"replicas: {rows}") from None
    counts = served_versions(client, 400)
    assert 260 <= counts["1"] <= 340, counts  # 75 % of 400, within ~4.6 standard deviations
    assert served_versions(client, 20, "/v2/models/mlp/versions/2/infer") == {"2": 20}
    unknown = client.post("/v2/models/mlp/versions/7/infer", json=ROW)
    assert unknown.status_code == 404

    services.do_rollback_deployment(deployment, 1, operator)  # v1 only, 3 replicas
    agent.settle(3)
    services.reconcile_all()  # v1 is fully ready: the v2 replica is retired
    agent.settle(3)
    wait_until(lambda: served_versions(client, 30) == {"1": 30}, 5, "rollback to take effect")

    _other, secret = services.do_create_api_key(name="scoped", user=operator,
                                               deployments=[], expires_in=None,
                                               rate_limit_rps=None)
    wait_until(lambda: httpx.post(f"{client.base_url}/v2/models/mlp/infer", json=ROW,
                                  headers={"Authorization": f"Bearer {secret}"}
                                  ).status_code == 403, 2, "403 for a key of no deployment")
    key = services.do_create_api_key(name="r", user=operator, deployments=["mlp"],
                                     expires_in=None, rate_limit_rps=None)
    headers = {"Authorization": f"Bearer {key[1]}"}
    wait_until(lambda: httpx.post(f"{client.base_url}/v2/models/mlp/infer", json=ROW,
                                  headers=headers).status_code == 200, 2, "the new key")
    services.do_revoke_api_key(key[0])
    revoked_at = time.monotonic()
    wait_until(lambda: httpx.post(f"{client.base_url}/v2/models/mlp/infer", json=ROW,
                                  headers=headers).status_code == 401, 2, "the revocation")
    assert time.monotonic() - revoked_at < 1.0


def test_moving_the_alias_under_load_fails_no_request(portal_fleet, operator):
    agent, client, model = portal_fleet["agent"], portal_fleet["client"], portal_fleet["model"]
    v1, v2 = model.versions.get(number=1), model.versions.get(number=2)
    registry_services.do_move_alias(model=model, alias_name="production", version=v1,
                                    user=operator)
    services.do_create_deployment(name="mlp", model=model, version_number=None,
                                  alias_name="production", user=operator, replicas=2)
    agent.settle(2)
    wait_until(lambda: client.post("/v2/models/mlp/infer", json=ROW).status_code == 200, 5,
               "the gateway to route")
    outcomes: Counter[str] = Counter()
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=str(client.base_url), headers=client.headers,
                          timeout=30) as own:
            while not stop.is_set():
                response = own.post("/v2/models/mlp/infer", json=ROW)
                outcomes[f"{response.status_code} {response.text[:100]}"
                         if response.status_code != 200
                         else "v" + response.json()["model_version"]] += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: outcomes["v1"] > 50, 20, "traffic on v1")
        registry_services.do_move_alias(model=model, alias_name="production", version=v2,
                                        user=operator)
        services.reconcile_all()
        agent.settle(2)  # v2 ready, then v1 drained and stopped
        services.reconcile_all()
        agent.settle(2)
        before = outcomes["v2"]
        wait_until(lambda: outcomes["v2"] > before + 50, 20, "traffic on v2 only")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    failures = {k: v for k, v in outcomes.items() if not k.startswith("v")}
    assert failures == {}, outcomes
    assert served_versions(client, 30) == {"2": 30}
    assert sorted(model.deployments.get().replica_set.filter(desired=True).values_list(
        "version__number", flat=True)) == [2, 2]
