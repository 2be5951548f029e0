"""Every page runs a fixed number of queries (session and user included), whatever the size:
100 nodes with 2 GPUs, 200 models, 20 deployments of 5 replicas, 50 API keys, 20 tokens."""

from __future__ import annotations

import pytest

from dashboards import history
from registry.models import Model, ModelVersion
from serving import live
from serving.models import ApiKey, Deployment, Gpu, JoinToken, Node, Replica, ReplicaState
from tests.factories import SIGNATURE

pytestmark = pytest.mark.django_db
NODES, MODELS, DEPLOYMENTS, REPLICAS_EACH = 100, 200, 20, 5
PAGE_QUERY_LIMITS = {
    "/overview/": 8, "/fleet/": 6, "/deployments/": 8, "/deployments/d-7/": 10,  # fleet: +replicas
    "/access/": 6, "/playground/": 4, "/models/": 5, "/models/m-7/": 8,
}


def make_fleet(user) -> None:
    """Rows straight into the tables: what the pages read, made fast."""
    models = Model.objects.bulk_create(
        [Model(name=f"m-{i}", description="", owner=user) for i in range(MODELS)])
    versions = ModelVersion.objects.bulk_create([
        ModelVersion(model=m, number=1, format="torchscript", artifact_name=f"a/{i}",
                     sha256=f"{i:064x}", size_bytes=1000, signature=SIGNATURE, created_by=user)
        for i, m in enumerate(models)])
    nodes = Node.objects.bulk_create([
        Node(name=f"n-{i}", address="10.0.0.1", labels={"zone": "a"}, cost_per_hour=1.5,
             secret_hash=f"{i:064x}") for i in range(NODES)])
    Gpu.objects.bulk_create([Gpu(node=n, index=g, uuid=f"{n.pk}-{g}", name="H100",
                                 memory_total_bytes=80 * 1024**3)
                             for n in nodes for g in range(2)])
    deployments = Deployment.objects.bulk_create([
        Deployment(name=f"d-{i}", model=models[i], version=versions[i], replicas=REPLICAS_EACH,
                   created_by=user) for i in range(DEPLOYMENTS)])
    replicas = Replica.objects.bulk_create([
        Replica(deployment=d, version=d.version, node=nodes[(i * REPLICAS_EACH + r) % NODES],
                gpu_index=r % 2, state=ReplicaState.READY)
        for i, d in enumerate(deployments) for r in range(REPLICAS_EACH)])
    for k in range(50):
        key = ApiKey.objects.create(name=f"k{k}", prefix=f"swk_{k}", key_hash=f"{k:064x}",
                                    created_by=user)
        key.deployments.set(deployments[:3])
    JoinToken.objects.bulk_create([JoinToken(name=f"t{t}", token_hash=f"{t:064x}",
                                             prefix=f"swj_{t}", created_by=user)
                                   for t in range(20)])
    _heartbeats(nodes, replicas)


def _heartbeats(nodes, replicas) -> None:
    by_node: dict[int, list[dict]] = {}
    for replica in replicas:
        by_node.setdefault(replica.node_id, []).append(
            {"replica_id": replica.pk, "state": "ready", "completed": 100, "failed": 1,
             "latency_p50_ms": 2.0, "latency_p99_ms": 9.0})
    for node in nodes:
        devices = [{"index": g, "utilization_pct": 40.0, "memory_used_bytes": 1024**3,
                    "temperature_c": 50.0, "power_w": 200.0} for g in range(2)]
        for step in range(3):
            at_s = 1000.0 + step * history.HISTORY_STEP_S
            live.record_heartbeat(node.pk, at_s, devices, by_node.get(node.pk, []))
            history.record(node.pk, at_s, devices, by_node.get(node.pk, []))


@pytest.mark.parametrize(("url", "limit"), PAGE_QUERY_LIMITS.items())
def test_each_page_runs_a_bounded_number_of_queries(client, operator, url, limit,
                                                    django_assert_max_num_queries):
    history._recorded_at_s.clear()
    make_fleet(operator)
    client.force_login(operator)
    with django_assert_max_num_queries(limit):
        response = client.get(url)
    assert response.status_code == 200
