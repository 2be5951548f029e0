"""Deployments: canary targets, revisions and rollback, alias roll-over, the route table."""

from __future__ import annotations

import pytest

from registry import services as registry_services
from serving import live, services
from serving.gateway_source import build_route_table, effective_weights
from serving.models import Deployment, Node, Replica, ReplicaState
from serving.secrets import digest
from swarm_protocol.agent_messages import (
    DeviceInfo,
    HeartbeatRequest,
    RegisterRequest,
    ReplicaStatus,
)
from tests.factories import add_version

pytestmark = pytest.mark.django_db(transaction=True)
CPU = DeviceInfo(index=0, kind="cpu", name="cpu", uuid="cpu-0",
                 memory_total_bytes=64 * 1024**3, memory_used_bytes=0, utilization_pct=1.0)


@pytest.fixture
def nodes(operator):
    _token, secret = services.do_create_join_token(name="t", user=operator, expires_in=None,
                                                   uses=None)
    return [Node.objects.get(pk=services.do_register_node(RegisterRequest(
        join_token=secret, name=name, address="127.0.0.1", cost_per_hour=1.0,
        devices=[CPU])).node_id) for name in ("a", "b")]


@pytest.fixture
def versions(model, operator, model_files):
    return (add_version(model, operator, model_files["torchscript"]),
            add_version(model, operator, model_files["torchscript_b"]))


def report_all_ready(nodes) -> None:
    """Play the agents: every desired replica reports ready."""
    for node in nodes:
        reply = services.do_heartbeat(node, HeartbeatRequest(devices=[CPU], replicas=[]))
        statuses = [ReplicaStatus(replica_id=d.replica_id, state="ready", port=9000 + i)
                    for i, d in enumerate(reply.desired)]
        services.do_heartbeat(node, HeartbeatRequest(devices=[CPU], replicas=statuses))


def live_versions(name: str) -> list[int]:
    return sorted(Replica.objects.filter(deployment__name=name, desired=True).values_list(
        "version__number", flat=True))


def test_a_canary_split_gets_replicas_for_each_version(nodes, versions, operator, model):
    deployment = services.do_create_deployment(name="mlp", model=model, version_number=1,
                                               alias_name="", user=operator, replicas=4)
    services.do_update_deployment(deployment, {"traffic": {"1": 75, "2": 25}}, operator)
    assert live_versions("mlp") == [1, 1, 1, 2]
    report_all_ready(nodes)
    table = build_route_table()
    assert table.deployments["mlp"].weights == {1: 75.0, 2: 25.0}
    assert len(table.deployments["mlp"].replicas) == 4


def test_bad_traffic_is_refused(versions, operator, model):
    deployment = services.do_create_deployment(name="mlp", model=model, version_number=1,
                                               alias_name="", user=operator)
    for traffic, fragment in (({"9": 1}, "no version 9"), ({"1": -1}, ">= 0"),
                              ({"1": 0}, "positive weight"), ({"x": 1}, "not a version")):
        with pytest.raises(Exception, match=fragment):
            services.do_update_deployment(deployment, {"traffic": traffic}, operator)
    assert Deployment.objects.get().revisions.count() == 1


def test_every_change_is_a_revision_and_rollback_restores_one(nodes, versions, operator,
                                                               model):
    deployment = services.do_create_deployment(name="mlp", model=model, version_number=1,
                                               alias_name="", user=operator, replicas=1)
    services.do_update_deployment(deployment, {"version": 2, "max_batch_size": 32}, operator)
    services.do_scale_deployment(deployment, 2, operator)
    revisions = list(deployment.revisions.values_list("number", "spec__version",
                                                      "spec__replicas"))
    assert revisions == [(3, 2, 2), (2, 2, 1), (1, 1, 1)]
    restored = services.do_rollback_deployment(deployment, 1, operator)
    assert (restored.version.number, restored.replicas, restored.max_batch_size) == (1, 1, 8)
    assert deployment.revisions.first().reason == "rolled back to revision 1"


def test_following_an_alias_rolls_over_only_once_the_new_version_is_ready(
        nodes, versions, operator, model):
    v1, v2 = versions
    registry_services.do_move_alias(model=model, alias_name="production", version=v1,
                                    user=operator)
    services.do_create_deployment(name="mlp", model=model, version_number=None,
                                  alias_name="production", user=operator, replicas=2)
    report_all_ready(nodes)
    registry_services.do_move_alias(model=model, alias_name="production", version=v2,
                                    user=operator)
    services.reconcile_all()
    assert live_versions("mlp") == [1, 1, 2, 2]  # old ones keep serving meanwhile
    assert build_route_table().deployments["mlp"].weights == {1: 1.0}
    report_all_ready(nodes)
    services.reconcile_all()
    assert live_versions("mlp") == [2, 2]
    table = build_route_table().deployments["mlp"]
    assert table.weights[2] == 1.0
    assert {r.version for r in table.replicas if not r.draining} == {2}
    assert Deployment.objects.get().revisions.first().reason == "alias production moved"


def test_effective_weights_keep_ready_versions_serving():
    assert effective_weights({2: 1.0}, {1}) == {1: 1.0}
    assert effective_weights({1: 3.0, 2: 1.0}, {1, 2}) == {1: 3.0, 2: 1.0}
    assert effective_weights({2: 1.0}, {1, 2}) == {1: 0.0, 2: 1.0}
    assert effective_weights({2: 1.0}, set()) == {2: 1.0}


def test_api_keys_are_hashed_scoped_and_revocable(operator, versions, model):
    services.do_create_deployment(name="mlp", model=model, version_number=1, alias_name="",
                                  user=operator)
    key, secret = services.do_create_api_key(name="client", user=operator,
                                             deployments=["mlp"], expires_in=None,
                                             rate_limit_rps=5.0)
    assert secret.startswith("swk_") and key.key_hash == digest(secret)
    before = live.routes_revision()
    route = build_route_table().api_keys[digest(secret)]
    assert route.deployments == frozenset({"mlp"}) and route.rate_limit_rps == 5.0
    services.do_revoke_api_key(key)
    assert live.routes_revision() != before
    assert digest(secret) not in build_route_table().api_keys
    with pytest.raises(Exception, match="no deployment named 'nope'"):
        services.do_create_api_key(name="x", user=operator, deployments=["nope"],
                                   expires_in=None, rate_limit_rps=None)


def test_the_route_table_is_built_in_a_bounded_number_of_queries(
        nodes, versions, operator, model, django_assert_max_num_queries):
    for name in ("a1", "a2", "a3"):
        services.do_create_deployment(name=name, model=model, version_number=1,
                                      alias_name="", user=operator, replicas=2)
        services.do_create_api_key(name=name, user=operator, deployments=[name],
                                   expires_in=None, rate_limit_rps=None)
    report_all_ready(nodes)
    with django_assert_max_num_queries(6):
        table = build_route_table()
    assert len(table.deployments) == 3 and len(table.api_keys) == 3
    assert all(len(d.replicas) == 2 for d in table.deployments.values())
    assert Replica.objects.filter(state=ReplicaState.READY).count() == 6


def test_prefix_affinity_is_a_deployment_setting_that_reaches_the_table(
        versions, operator_api, model):
    created = operator_api.post("/api/deployments/", {
        "name": "lm", "model": model.name, "version": 1, "replicas": 0,
        "prefix_affinity_chars": 64}, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["prefix_affinity_chars"] == 64
    assert build_route_table().deployments["lm"].prefix_affinity_chars == 64
    for bad in (-1, 100_001, "many", None):
        refused = operator_api.patch("/api/deployments/lm/", {"prefix_affinity_chars": bad},
                                     format="json")
        assert refused.status_code == 400, (bad, refused.content)
    off = operator_api.patch("/api/deployments/lm/", {"prefix_affinity_chars": 0},
                             format="json")
    assert off.status_code == 200, off.content
    assert build_route_table().deployments["lm"].prefix_affinity_chars == 0
    assert Deployment.objects.get(name="lm").revisions.count() == 2  # a change, recorded
