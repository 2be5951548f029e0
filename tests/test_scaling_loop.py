"""The auto-scaler's loop: policies, the tick over real rows, claims, events, activation."""

from __future__ import annotations

import threading

import pytest
from django.db import connection

from scaling import services as scaling
from scaling.models import ScalingEvent, ScalingPolicy
from serving import services
from serving.gateway_source import build_route_table
from serving.models import Deployment, Node, Replica
from swarm_portal.errors import ServiceError
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
T0 = 1_800_000_000.0  # a fixed "now": the tick takes the clock as a parameter


@pytest.fixture
def node(operator) -> Node:
    _token, secret = services.do_create_join_token(name="t", user=operator, expires_in=None,
                                                   uses=None)
    return Node.objects.get(pk=services.do_register_node(RegisterRequest(
        join_token=secret, name="n1", address="127.0.0.1", cost_per_hour=1.0,
        devices=[CPU])).node_id)


@pytest.fixture
def deployment(model, operator, model_files, node) -> Deployment:
    add_version(model, operator, model_files["torchscript"])
    return services.do_create_deployment(name="mlp", model=model, version_number=1,
                                         alias_name="", user=operator, replicas=1)


def report(node: Node, in_flight_each: int, mean_in_flight: float | None = None) -> None:
    """Play the agent: every desired replica is ready with this many requests in flight."""
    reply = services.do_heartbeat(node, HeartbeatRequest(devices=[CPU], replicas=[]))
    services.do_heartbeat(node, HeartbeatRequest(devices=[CPU], replicas=[
        ReplicaStatus(replica_id=d.replica_id, state="ready", port=9000 + i,
                      in_flight=in_flight_each, mean_in_flight=mean_in_flight)
        for i, d in enumerate(reply.desired)]))


def policy(deployment: Deployment, **fields) -> ScalingPolicy:
    return scaling.do_set_policy(deployment, **{
        "min_replicas": 1, "max_replicas": 4, "target_in_flight_per_replica": 2.0,
        "stable_window_s": 60.0, "panic_window_s": 6.0, "scale_down_delay_s": 10.0, **fields})


def test_a_burst_raises_replicas_records_an_event_and_places_them(node, deployment):
    policy(deployment)
    report(node, in_flight_each=8)  # 8 in flight against a target of 2: panic
    events = scaling.tick(T0)
    deployment.refresh_from_db()
    assert deployment.replicas == 4  # 8 / 2, within max 4
    assert [(e.from_replicas, e.to_replicas, e.panic) for e in events] == [(1, 4, True)]
    assert events[0].reason.startswith("panic: ")
    assert events[0].inputs["replicas_reporting"] == 1
    assert Replica.objects.filter(deployment=deployment, desired=True).count() == 4


def test_one_tick_decides_a_deployment_once_even_when_two_schedulers_run_it(
        node, deployment):
    policy(deployment)
    report(node, in_flight_each=8)
    results: list[int] = []

    def run() -> None:
        try:
            results.append(len(scaling.tick(T0)))
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(results) == [0, 1]
    assert ScalingEvent.objects.count() == 1
    assert len(ScalingPolicy.objects.get().state["samples"]) == 1  # decided once


def test_the_mean_concurrency_since_the_last_heartbeat_is_the_demand_when_known(
        node, deployment):
    policy(deployment)
    # Idle at the heartbeat's instant, but 6 requests in flight on average since the last.
    report(node, in_flight_each=0, mean_in_flight=6.0)
    events = scaling.tick(T0)
    assert [(e.from_replicas, e.to_replicas) for e in events] == [(1, 3)]
    assert events[0].inputs["panic_demand"] == 6.0


def test_steady_load_changes_nothing_and_the_state_is_persisted(node, deployment):
    policy(deployment)
    for second in range(5):
        report(node, in_flight_each=2)
        assert scaling.tick(T0 + second) == []
    deployment.refresh_from_db()
    assert deployment.replicas == 1
    state = ScalingPolicy.objects.get().state
    assert [demand for _, demand in state["samples"]] == [2.0] * 5


def test_scale_down_waits_for_the_delay_across_a_scheduler_restart(node, deployment):
    policy(deployment, min_replicas=1)
    services.do_update_deployment(deployment, {"replicas": 3}, None)  # as a tick would
    report(node, in_flight_each=0)
    assert scaling.tick(T0) == []  # the delay starts now
    # A "restart": nothing in memory; the next ticks read the persisted state.
    assert scaling.tick(T0 + 5) == []
    events = scaling.tick(T0 + 11)
    assert [(e.from_replicas, e.to_replicas) for e in events] == [(3, 1)]
    assert "scale down" in events[0].reason
    assert Replica.objects.filter(deployment=deployment, desired=True).count() == 1


def test_idle_deployment_goes_to_zero_and_a_held_request_activates_it(node, deployment):
    policy(deployment, min_replicas=0, scale_to_zero=True, idle_before_zero_s=30.0)
    deployment.refresh_from_db()
    assert deployment.hold_at_zero
    report(node, in_flight_each=0)
    scaling.tick(T0)
    events = scaling.tick(T0 + 31)
    assert [(e.from_replicas, e.to_replicas) for e in events] == [(1, 0)]
    assert build_route_table().deployments["mlp"].hold_timeout_s > 0

    event = scaling.do_activate(deployment.pk, held=3, now_s=T0 + 40)
    assert event is not None and (event.from_replicas, event.to_replicas) == (0, 2)
    assert event.reason.startswith("cold start: 3 held requests")
    # Only while at zero: a second activation for the same burst changes nothing.
    assert scaling.do_activate(deployment.pk, held=3, now_s=T0 + 40.5) is None


def test_held_requests_reported_by_gateways_count_as_demand(node, deployment):
    policy(deployment, min_replicas=0, scale_to_zero=True, idle_before_zero_s=0.0)
    report(node, in_flight_each=0)
    scaling.tick(T0)
    assert Deployment.objects.get().replicas == 0
    scaling.record_held(deployment.pk, 5)
    events = scaling.tick(T0 + 1)
    assert [(e.from_replicas, e.to_replicas) for e in events] == [(0, 3)]


@pytest.mark.parametrize(("fields", "message"), [
    ({"min_replicas": 3, "max_replicas": 2}, "max_replicas"),
    ({"min_replicas": 0}, "scale_to_zero"),
    ({"target_in_flight_per_replica": 0}, "target_in_flight_per_replica"),
    ({"panic_window_s": 120.0}, "panic_window_s"),
    ({"colour": "blue"}, "unknown policy fields: colour"),
])
def test_bad_policies_are_refused_and_nothing_is_saved(deployment, fields, message):
    with pytest.raises(ServiceError, match=message):
        policy(deployment, **fields)
    assert not ScalingPolicy.objects.exists()


def test_a_disabled_or_removed_policy_is_not_ticked(node, deployment):
    policy(deployment, enabled=False)
    report(node, in_flight_each=8)
    assert scaling.tick(T0) == []
    assert not Deployment.objects.get().hold_at_zero
    policy(deployment, enabled=True, min_replicas=0, scale_to_zero=True)
    assert Deployment.objects.get().hold_at_zero
    assert scaling.do_clear_policy(deployment)
    assert not Deployment.objects.get().hold_at_zero
    assert scaling.tick(T0 + 1) == []


def test_the_policy_api_sets_reads_and_removes(operator_api, viewer_api, deployment):
    url = "/api/deployments/mlp/policy/"
    assert operator_api.get(url).status_code == 404
    created = operator_api.put(url, {"min_replicas": 1, "max_replicas": 3}, format="json")
    assert created.status_code == 200, created.content
    assert created.json()["max_replicas"] == 3
    assert created.json()["stable_window_s"] == 60.0  # omitted: the default
    patched = operator_api.patch(url, {"max_step_up": 2}, format="json")
    assert (patched.json()["max_step_up"], patched.json()["max_replicas"]) == (2, 3)
    bad = operator_api.patch(url, {"min_replicas": 5}, format="json")
    assert bad.status_code == 400 and "max_replicas" in bad.json()["error"]
    assert viewer_api.get(url).json()["max_replicas"] == 3
    assert viewer_api.put(url, {"max_replicas": 9}, format="json").status_code == 403
    assert operator_api.put("/api/deployments/nope/policy/", {}, format="json"
                            ).status_code == 404
    assert operator_api.delete(url).status_code == 204
    assert operator_api.delete(url).status_code == 404


def test_the_events_api_lists_newest_first_with_reasons(viewer_api, node, deployment):
    policy(deployment)
    report(node, in_flight_each=8)
    scaling.tick(T0)
    body = viewer_api.get("/api/scaling-events/?deployment=mlp").json()
    assert body["count"] == 1
    assert body["results"][0]["to_replicas"] == 4
    assert body["results"][0]["reason"].startswith("panic")
    assert viewer_api.get("/api/scaling-events/?deployment=other").json()["count"] == 0


def test_the_demo_gets_a_policy_once_and_keeps_an_edited_one(operator, model_files):
    from django.core.management import call_command

    from registry.demo import DEMO_MODEL_NAME
    from registry.models import Model

    call_command("ensure_demo_policy")  # no demo deployment yet: nothing happens
    assert not ScalingPolicy.objects.exists()
    demo = Model.objects.create(name=DEMO_MODEL_NAME, owner=operator)
    add_version(demo, operator, model_files["torchscript"])
    deployment = services.do_create_deployment(name=DEMO_MODEL_NAME, model=demo,
                                               version_number=1, alias_name="",
                                               user=operator, replicas=2)
    call_command("ensure_demo_policy")
    assert ScalingPolicy.objects.get().max_replicas == 3
    scaling.do_set_policy(deployment, max_replicas=5)
    call_command("ensure_demo_policy")
    assert ScalingPolicy.objects.get().max_replicas == 5
