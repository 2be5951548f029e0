"""Nodes: join tokens, registration, heartbeats, the offline sweep, drain and removal."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from serving import live, services
from serving.models import Deployment, Node, NodeStatus, Replica, ReplicaState
from serving.services.nodes import Unauthorized
from swarm_portal import stopping
from swarm_protocol.agent_messages import (
    DeviceInfo,
    HeartbeatRequest,
    RegisterRequest,
    ReplicaStatus,
)
from tests.factories import add_version

pytestmark = pytest.mark.django_db(transaction=True)
GIB = 1024**3


def gpu(index: int = 0, used_gib: float = 1.0, util: float = 10.0) -> DeviceInfo:
    return DeviceInfo(index=index, kind="gpu", name="NVIDIA H100", uuid=f"GPU-{index}",
                      memory_total_bytes=80 * GIB, memory_used_bytes=int(used_gib * GIB),
                      utilization_pct=util, temperature_c=40.0, power_w=120.0)


def register(token: str, name: str = "gpu-a", devices=None, now=None):
    message = RegisterRequest(join_token=token, name=name, address="127.0.0.1",
                              cost_per_hour=1.5, devices=devices or [gpu()])
    return services.do_register_node(message, now=now)


@pytest.fixture
def join_token(operator):
    _token, secret = services.do_create_join_token(name="lab", user=operator, expires_in=None,
                                                   uses=None)
    return secret


def test_a_join_token_is_shown_once_and_stored_hashed(operator):
    token, secret = services.do_create_join_token(name="t", user=operator, expires_in=None,
                                                  uses=2)
    assert secret.startswith("swj_") and len(secret) > 40
    assert secret not in (token.token_hash, token.prefix)
    assert token.prefix == secret[:10]


def test_registration_creates_the_node_and_its_gpus(join_token):
    reply = register(join_token, devices=[gpu(0), gpu(1)])
    node = Node.objects.get(pk=reply.node_id)
    assert reply.node_secret.startswith(f"swn_{node.pk}_")
    assert node.secret_hash != reply.node_secret
    assert [g.uuid for g in node.gpus.all()] == ["GPU-0", "GPU-1"]
    assert services.authenticate_node(f"Bearer {reply.node_secret}") == node
    assert len(reply.replica_key) == 64


@pytest.mark.parametrize("case", ["revoked", "expired", "used-up", "unknown"])
def test_bad_join_tokens_are_refused(operator, case):
    token, secret = services.do_create_join_token(
        name="t", user=operator, expires_in=timedelta(hours=1), uses=1)
    now = None
    if case == "revoked":
        services.do_revoke_join_token(token)
    elif case == "expired":
        now = timezone.now() + timedelta(hours=2)
    elif case == "used-up":
        register(secret)
    elif case == "unknown":
        secret = "swj_nope"
    with pytest.raises(Unauthorized):
        register(secret, now=now)


def test_node_secrets_are_checked(join_token):
    reply = register(join_token)
    for header in ("", "Bearer swn_1_wrong", f"Bearer {reply.node_secret}x",
                   f"Token {reply.node_secret}", "Bearer swn_x"):
        with pytest.raises(Unauthorized):
            services.authenticate_node(header)


def test_heartbeats_keep_figures_in_the_cache_not_the_database(join_token,
                                                               django_assert_max_num_queries):
    reply = register(join_token)
    node = Node.objects.get(pk=reply.node_id)
    t0 = timezone.now()
    services.do_heartbeat(node, HeartbeatRequest(devices=[gpu(util=77.0)], replicas=[]), now=t0)
    assert live.node_figures(node.pk)["devices"][0]["utilization_pct"] == 77.0
    node.refresh_from_db()
    persisted = node.last_heartbeat_at
    later = t0 + timedelta(seconds=1)
    with django_assert_max_num_queries(6):
        services.do_heartbeat(node, HeartbeatRequest(devices=[gpu(util=12.0)], replicas=[]),
                              now=later)
    node.refresh_from_db()
    assert node.last_heartbeat_at == persisted  # not rewritten every second
    assert live.node_figures(node.pk)["devices"][0]["utilization_pct"] == 12.0


def test_a_node_missing_three_heartbeats_goes_offline_and_its_replicas_move(
        join_token, operator, model, model_files):
    first = Node.objects.get(pk=register(join_token, "a").node_id)
    version = add_version(model, operator, model_files["torchscript"])
    deployment = services.do_create_deployment(
        name="mlp", model=model, version_number=version.number, alias_name="", user=operator,
        replicas=1)
    replica = Replica.objects.get(deployment=deployment)
    assert replica.node == first
    second = Node.objects.get(pk=register(join_token, "b").node_id)
    t0 = timezone.now()
    for node in (first, second):
        services.do_heartbeat(node, HeartbeatRequest(devices=[gpu()], replicas=[]), now=t0)
    assert services.sweep_nodes(now=t0) == []  # the sweep runs every second from here
    assert services.sweep_nodes(now=t0 + timedelta(seconds=2)) == []
    # The portal took the other node's heartbeats for more than 3 s without this one's.
    services.do_heartbeat(second, HeartbeatRequest(devices=[gpu()], replicas=[]),
                          now=t0 + timedelta(seconds=3.5))
    assert services.sweep_nodes(now=t0 + timedelta(seconds=3.5)) == [first.pk]
    first.refresh_from_db()
    assert first.status == NodeStatus.OFFLINE
    replica.refresh_from_db()
    assert (replica.state, replica.desired) == (ReplicaState.FAILED, False)
    moved = Replica.objects.get(deployment=deployment, desired=True)
    assert moved.node == second
    # It comes back: ready again, and told to run nothing (its replica moved).
    reply = services.do_heartbeat(first, HeartbeatRequest(devices=[gpu()], replicas=[]),
                                  now=t0 + timedelta(seconds=5))
    first.refresh_from_db()
    assert first.status == NodeStatus.READY
    assert reply.desired == []


def test_replica_states_follow_the_agent_reports(join_token, operator, model, model_files):
    node = Node.objects.get(pk=register(join_token).node_id)
    version = add_version(model, operator, model_files["torchscript"])
    deployment = services.do_create_deployment(
        name="mlp", model=model, version_number=version.number, alias_name="", user=operator)
    reply = services.do_heartbeat(node, HeartbeatRequest(devices=[gpu()], replicas=[]))
    [desired] = reply.desired
    assert (desired.model_name, desired.version, desired.sha256) == ("mlp", 1, version.sha256)
    assert desired.device == "cuda:0"
    ready = ReplicaStatus(replica_id=desired.replica_id, state="ready", port=9100)
    services.do_heartbeat(node, HeartbeatRequest(devices=[gpu()], replicas=[ready]))
    replica = Replica.objects.get(pk=desired.replica_id)
    assert (replica.state, replica.port) == (ReplicaState.READY, 9100)
    assert replica.ready_at is not None
    services.do_scale_deployment(deployment, 0)
    replica.refresh_from_db()
    assert replica.desired is False
    reply = services.do_heartbeat(node, HeartbeatRequest(devices=[gpu()], replicas=[ready]))
    assert reply.desired == []
    replica.refresh_from_db()
    assert replica.state == ReplicaState.DRAINING
    services.do_heartbeat(node, HeartbeatRequest(devices=[gpu()], replicas=[]))
    replica.refresh_from_db()
    assert replica.state == ReplicaState.STOPPED


def test_a_failed_replica_is_replaced(join_token, operator, model, model_files):
    node = Node.objects.get(pk=register(join_token).node_id)
    version = add_version(model, operator, model_files["torchscript"])
    services.do_create_deployment(name="mlp", model=model, version_number=version.number,
                                  alias_name="", user=operator)
    [desired] = services.do_heartbeat(node, HeartbeatRequest(devices=[gpu()], replicas=[])
                                      ).desired
    failed = ReplicaStatus(replica_id=desired.replica_id, state="failed",
                           error="sha256 mismatch: artifact corrupt")
    reply = services.do_heartbeat(node, HeartbeatRequest(devices=[gpu()], replicas=[failed]))
    assert Replica.objects.get(pk=desired.replica_id).error.startswith("sha256 mismatch")
    assert [d.replica_id for d in reply.desired] != [desired.replica_id]
    assert len(reply.desired) == 1


def test_drain_and_remove(join_token, operator, model, model_files):
    a = Node.objects.get(pk=register(join_token, "a").node_id)
    b = Node.objects.get(pk=register(join_token, "b").node_id)
    version = add_version(model, operator, model_files["torchscript"])
    deployment = services.do_create_deployment(
        name="mlp", model=model, version_number=version.number, alias_name="", user=operator,
        replicas=2)
    assert sorted(Replica.objects.values_list("node__name", flat=True)) == ["a", "b"]
    services.do_drain_node(a)
    a.refresh_from_db()
    assert a.status == NodeStatus.DRAINING
    live_replicas = Replica.objects.filter(deployment=deployment, desired=True)
    assert [r.node.name for r in live_replicas] == ["b", "b"]
    services.do_remove_node(b)
    assert not Node.objects.filter(name="b").exists()
    assert Replica.objects.filter(deployment=deployment, desired=True, node__isnull=True
                                  ).count() == 2
    assert Deployment.objects.get().replicas == 2


@pytest.mark.parametrize("shutting_down", [False, True])
def test_while_make_run_stops_a_leaving_nodes_replicas_are_not_re_placed(
        join_token, operator, model, model_files, settings, tmp_path, shutting_down):
    settings.VAR_DIR = tmp_path
    if shutting_down:
        stopping.mark_stopping(tmp_path)
    leaving = Node.objects.get(pk=register(join_token, "a").node_id)
    version = add_version(model, operator, model_files["torchscript"])
    deployment = services.do_create_deployment(
        name="mlp", model=model, version_number=version.number, alias_name="", user=operator,
        replicas=1)
    staying = Node.objects.get(pk=register(join_token, "b").node_id)
    services.do_deregister_node(leaving)
    placed = Replica.objects.filter(deployment=deployment, desired=True, node=staying)
    assert placed.exists() is not shutting_down
