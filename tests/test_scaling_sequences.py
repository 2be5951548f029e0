"""The auto-scaler's "sequences" metric: running + waiting sequences per replica (issue 14).

The pure decision first (time as a parameter), then the service: heartbeat figures reach
the decision through the live cache, and the metric is set through the API and the page.
"""

from __future__ import annotations

import pytest

from scaling import services as scaling
from scaling.models import ScalingPolicy
from scaling.policy import (
    METRIC_SEQUENCES,
    ReplicaSample,
    ScalingInputs,
    ScalingPolicyConfig,
    ScalingState,
    decide,
)
from serving import services
from serving.models import Deployment, Node
from swarm_portal.errors import ServiceError
from swarm_protocol.agent_messages import HeartbeatRequest, ReplicaStatus
from tests.dashboards_helpers import gpu

T0 = 1_800_000_000.0  # a fixed "now": the tick takes the clock as a parameter

SEQUENCES = ScalingPolicyConfig(min_replicas=1, max_replicas=10, target_in_flight_per_replica=2,
                                target_sequences_per_replica=8, metric=METRIC_SEQUENCES)
IN_FLIGHT = ScalingPolicyConfig(min_replicas=1, max_replicas=10, target_in_flight_per_replica=2,
                                target_sequences_per_replica=8)


def generating(sequences: float, in_flight: float = 1.0) -> ReplicaSample:
    return ReplicaSample(in_flight=in_flight, sequences=sequences)


# --- the pure decision ---------------------------------------------------------------


def test_sequences_per_replica_drive_the_count_and_the_reason_names_them():
    # 2 replicas, 20 + 12 sequences against 8 each: a burst (32 >= 2 x 16).
    inputs = ScalingInputs(T0, 2, [generating(20), generating(12)])
    decision = decide(SEQUENCES, inputs, ScalingState())
    assert decision.desired_replicas == 4
    assert decision.reason == ("panic: demand 32.0 sequences over 6 s >= 2x capacity "
                               "16 sequences; 2 -> 4")
    # The same replicas under the in-flight metric: one request in flight each, 2 each is
    # the target, so nothing to do.
    assert decide(IN_FLIGHT, inputs, ScalingState()).desired_replicas == 2


def test_a_steady_sequence_load_gives_a_stable_reason_in_sequences():
    state, decision = ScalingState(), None
    for second in range(0, 62, 2):  # a full stable window at 20 sequences on 2 replicas
        decision = decide(SEQUENCES, ScalingInputs(T0 + second, 2, [generating(10),
                                                                     generating(10)]), state)
        state = decision.state
    assert decision is not None and decision.desired_replicas == 3
    assert decision.reason == ("scale up: demand 20.0 sequences over 60 s needs 3 at "
                               "8 sequences per replica; 2 -> 3")


def test_a_replica_without_sequence_figures_counts_its_requests_in_flight():
    # An older agent's replica says nothing of sequences: its 30 requests stand in.
    inputs = ScalingInputs(T0, 1, [ReplicaSample(in_flight=30.0), generating(2)])
    assert inputs.demand_for(METRIC_SEQUENCES) == 32.0
    assert decide(SEQUENCES, inputs, ScalingState()).desired_replicas == 4


def test_held_requests_at_zero_start_replicas_as_sequences():
    config = ScalingPolicyConfig(min_replicas=0, max_replicas=10, scale_to_zero=True,
                                 target_in_flight_per_replica=1,
                                 target_sequences_per_replica=8, metric=METRIC_SEQUENCES)
    decision = decide(config, ScalingInputs(T0, 0, [], held_requests=20), ScalingState())
    assert decision.desired_replicas == 3
    assert decision.reason.startswith("cold start: 20 held requests at zero need 3 at "
                                      "8 sequences per replica")


@pytest.mark.parametrize(("fields", "message"), [
    ({"metric": "tokens"}, "metric: must be one of in_flight, sequences"),
    ({"target_sequences_per_replica": 0.0}, "target_sequences_per_replica: must be > 0"),
    ({"target_sequences_per_replica": float("inf")}, "must be a finite number"),
])
def test_bad_metric_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        ScalingPolicyConfig(min_replicas=1, max_replicas=2, target_in_flight_per_replica=1,
                            **fields)


# --- heartbeats to decisions (real rows, the live cache) -----------------------------


def report_sequences(node_row: Node, running: int | None, waiting: int | None) -> None:
    """Play the agent: every desired replica is ready and generating."""
    reply = services.do_heartbeat(node_row, HeartbeatRequest(devices=[gpu()], replicas=[]))
    services.do_heartbeat(node_row, HeartbeatRequest(devices=[gpu()], replicas=[
        ReplicaStatus(replica_id=d.replica_id, state="ready", port=9100 + i, in_flight=1,
                      mean_in_flight=1.0, running_sequences=running, waiting_sequences=waiting)
        for i, d in enumerate(reply.desired)]))


@pytest.mark.django_db(transaction=True)
def test_heartbeat_sequences_reach_the_decision_and_the_event(gpu_node, served_deployment):
    scaling.do_set_policy(served_deployment, min_replicas=1, max_replicas=6,
                          target_in_flight_per_replica=8.0, metric=METRIC_SEQUENCES,
                          target_sequences_per_replica=4.0)
    report_sequences(gpu_node, running=16, waiting=4)  # 20 against 4 per replica
    events = scaling.tick(T0)
    served_deployment.refresh_from_db()
    assert served_deployment.replicas == 5
    [event] = events
    assert "20.0 sequences" in event.reason and "4 sequences" in event.reason
    assert event.inputs["metric"] == "sequences" and event.inputs["panic_demand"] == 20.0


@pytest.mark.django_db(transaction=True)
def test_the_in_flight_metric_ignores_the_sequences(gpu_node, served_deployment):
    scaling.do_set_policy(served_deployment, min_replicas=1, max_replicas=6,
                          target_in_flight_per_replica=8.0, target_sequences_per_replica=4.0)
    report_sequences(gpu_node, running=16, waiting=4)
    assert scaling.tick(T0) == []  # one request in flight against 8


@pytest.mark.django_db(transaction=True)
def test_changing_the_metric_forgets_the_windows_of_the_other_unit(gpu_node, served_deployment):
    scaling.do_set_policy(served_deployment, min_replicas=1, max_replicas=6,
                          target_in_flight_per_replica=8.0)
    report_sequences(gpu_node, running=0, waiting=0)
    scaling.tick(T0)
    assert ScalingPolicy.objects.get().state["samples"]
    scaling.do_set_policy(served_deployment, max_replicas=5)  # the same metric: kept
    assert ScalingPolicy.objects.get().state["samples"]
    scaling.do_set_policy(served_deployment, metric=METRIC_SEQUENCES)
    assert ScalingPolicy.objects.get().state == {}
    with pytest.raises(ServiceError, match="metric"):
        scaling.do_set_policy(served_deployment, metric="tokens")
    assert ScalingPolicy.objects.get().metric == METRIC_SEQUENCES


@pytest.mark.django_db(transaction=True)
def test_the_api_and_the_page_set_the_metric(operator_api, client, operator,
                                             served_deployment: Deployment):
    url = "/api/deployments/mlp/policy/"
    created = operator_api.put(url, {"min_replicas": 1, "max_replicas": 3,
                                     "metric": "sequences",
                                     "target_sequences_per_replica": 6}, format="json")
    assert created.status_code == 200, created.content
    assert (created.json()["metric"], created.json()["target_sequences_per_replica"]) == (
        "sequences", 6.0)
    bad = operator_api.patch(url, {"metric": "tokens"}, format="json")
    assert bad.status_code == 400 and "metric" in bad.content.decode()
    assert operator_api.get(url).json()["metric"] == "sequences"

    client.force_login(operator)
    page = client.get("/deployments/mlp/").content.decode()
    assert "target 6.0 running + waiting sequences per replica" in page
    form = {"enabled": "on", "min_replicas": 1, "max_replicas": 3,
            "target_in_flight_per_replica": 4, "stable_window_s": 30, "panic_window_s": 3,
            "scale_down_delay_s": 10, "idle_before_zero_s": 300}
    client.post("/deployments/mlp/policy/", form)  # a form without the metric keeps it
    assert ScalingPolicy.objects.get().metric == "sequences"
    client.post("/deployments/mlp/policy/", {**form, "metric": "in_flight",
                                             "target_sequences_per_replica": 9})
    policy = ScalingPolicy.objects.get()
    assert (policy.metric, policy.target_sequences_per_replica) == ("in_flight", 9.0)
