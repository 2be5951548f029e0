"""Every auto-scaler write: policies, the periodic tick, cold-start activation.

The decision itself is the pure `scaling.policy.decide`; this module gathers its inputs
(replica figures from the heartbeat cache, held requests), claims each deployment for
one tick with a conditional UPDATE (two Celery workers never decide the same tick),
persists the policy state, records a `ScalingEvent` for every change, sets the
deployment's replica count and lets reconcile place or drain replicas.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db import transaction

from scaling.models import ScalingEvent, ScalingPolicy
from scaling.policy import (
    Decision,
    ReplicaSample,
    ScalingInputs,
    ScalingPolicyConfig,
    ScalingState,
    decide,
)
from serving import live
from serving.models import ACTIVE_REPLICA_STATES, Deployment, Replica
from serving.services.reconcile import reconcile_deployment
from serving.services.revisions import record_revision
from swarm_portal import live_events
from swarm_portal.errors import ServiceError
from swarm_portal.live_events import DeploymentScaled

log = logging.getLogger(__name__)
POLICY_FIELDS = ("enabled", "min_replicas", "max_replicas", "target_in_flight_per_replica",
                 "stable_window_s", "panic_window_s", "panic_threshold", "scale_down_delay_s",
                 "max_step_up", "max_step_down", "scale_to_zero", "idle_before_zero_s",
                 "metric", "target_sequences_per_replica")
HELD_TTL_S = 5  # a gateway re-reports held requests every second while it holds them


def config_of(policy: ScalingPolicy) -> ScalingPolicyConfig:
    """Return the pure policy's settings for a policy row."""
    names = [name for name in POLICY_FIELDS if name != "enabled"]
    return ScalingPolicyConfig(**{name: getattr(policy, name) for name in names})


def do_set_policy(deployment: Deployment, **fields: Any) -> ScalingPolicy:
    """Create or change a deployment's scaling policy; refuse bad values with a 400."""
    unknown = sorted(set(fields) - set(POLICY_FIELDS))
    if unknown:
        raise ServiceError(f"unknown policy fields: {', '.join(unknown)}")
    with transaction.atomic():
        policy = (ScalingPolicy.objects.select_for_update().filter(deployment=deployment)
                  .first() or ScalingPolicy(deployment=deployment))
        if fields.get("metric", policy.metric) != policy.metric:
            policy.state = {}  # its windows hold demand in the other metric's unit
        for name, value in fields.items():
            setattr(policy, name, value)
        try:
            config_of(policy)
        except (TypeError, ValueError) as exc:
            raise ServiceError(str(exc)) from None
        policy.save()
        _set_hold_at_zero(deployment, policy.enabled)
    return policy


def do_clear_policy(deployment: Deployment) -> bool:
    """Remove a deployment's policy (its replica count stays as it is); return if one was."""
    with transaction.atomic():
        deleted, _ = ScalingPolicy.objects.filter(deployment=deployment).delete()
        _set_hold_at_zero(deployment, False)
    return bool(deleted)


def _set_hold_at_zero(deployment: Deployment, hold: bool) -> None:
    if Deployment.objects.filter(pk=deployment.pk).exclude(hold_at_zero=hold).update(
            hold_at_zero=hold):
        live.bump_routes_on_commit()  # the gateways learn whether to hold at zero


# held requests (reported by gateways while a deployment is at zero)

def _held_key(deployment_id: int) -> str:
    return f"scaling:held:{deployment_id}"


def record_held(deployment_id: int, held: int) -> None:
    """Remember how many requests a gateway holds for a deployment at zero."""
    cache.set(_held_key(deployment_id), int(held), HELD_TTL_S)


def held_requests(deployment_ids: list[int]) -> dict[int, int]:
    """Return held requests per deployment (absent: none)."""
    found = cache.get_many([_held_key(pk) for pk in deployment_ids])
    return {int(key.rsplit(":", 1)[1]): int(value) for key, value in found.items()}


# the tick

def tick_number(now_s: float) -> int:
    """Return the tick a moment belongs to; each deployment is decided once per tick."""
    return math.floor(now_s / settings.SCALING_TICK_S)


@dataclass(frozen=True)
class _Figures:
    """Heartbeat figures of every node, read once per tick."""

    by_replica: dict[int, ReplicaSample]

    @classmethod
    def read(cls, node_ids: list[int]) -> _Figures:
        samples = {}
        for figures in live.nodes_figures(node_ids).values():
            for status in figures.get("replicas", []):
                samples[int(status["replica_id"])] = _sample(status)
        return cls(samples)


def _sample(status: dict[str, Any]) -> ReplicaSample:
    """Return a replica's demand: its mean concurrency since the last heartbeat if known,
    and its running + waiting sequences if it is generative (ReplicaStatus checked them).

    The replica's in_flight already includes the requests queued for a batch, so the
    queue depth is not added again.
    """
    mean = status.get("mean_in_flight")
    running, waiting = status.get("running_sequences"), status.get("waiting_sequences")
    sequences = None if running is None and waiting is None else \
        float((running or 0) + (waiting or 0))
    return ReplicaSample(in_flight=float(status.get("in_flight", 0) if mean is None else mean),
                         sequences=sequences)


def tick(now_s: float | None = None) -> list[ScalingEvent]:
    """Decide every deployment with an enabled policy; return the events of changes."""
    now_s = time.time() if now_s is None else now_s
    number = tick_number(now_s)
    policy_ids = list(ScalingPolicy.objects.filter(
        enabled=True, last_tick__lt=number, deployment__deleting=False).values_list(
        "pk", "deployment_id"))
    if not policy_ids:
        return []
    replicas = _active_replicas([deployment_id for _, deployment_id in policy_ids])
    figures = _Figures.read(sorted({node for rows in replicas.values()
                                    for _, node in rows if node is not None}))
    held = held_requests([deployment_id for _, deployment_id in policy_ids])
    events = []
    for policy_id, deployment_id in policy_ids:
        if not _claim(policy_id, number):
            continue  # another scheduler took this deployment for this tick
        samples = [figures.by_replica[pk] for pk, _ in replicas.get(deployment_id, [])
                   if pk in figures.by_replica]
        event = _decide_and_apply(policy_id, now_s, samples, held.get(deployment_id, 0))
        if event is not None:
            events.append(event)
    return events


def _claim(policy_id: int, number: int) -> bool:
    return ScalingPolicy.objects.filter(pk=policy_id, last_tick__lt=number).update(
        last_tick=number) == 1


def _active_replicas(deployment_ids: list[int]) -> dict[int, list[tuple[int, int | None]]]:
    rows = Replica.objects.filter(deployment_id__in=deployment_ids, desired=True,
                                  state__in=ACTIVE_REPLICA_STATES).values_list(
        "deployment_id", "pk", "node_id")
    found: dict[int, list[tuple[int, int | None]]] = {}
    for deployment_id, pk, node_id in rows:
        found.setdefault(deployment_id, []).append((pk, node_id))
    return found


def do_activate(deployment_id: int, held: int, now_s: float | None = None,
                ) -> ScalingEvent | None:
    """Decide a deployment at once because a gateway holds requests for it (cold start)."""
    now_s = time.time() if now_s is None else now_s
    record_held(deployment_id, held)
    policy_id = ScalingPolicy.objects.filter(
        deployment_id=deployment_id, enabled=True, deployment__deleting=False,
        deployment__replicas=0).values_list("pk", flat=True).first()
    if policy_id is None:
        return None  # not at zero any more, or no policy: the tick handles the rest
    return _decide_and_apply(policy_id, now_s, [], held)


def _decide_and_apply(policy_id: int, now_s: float, samples: list[ReplicaSample],
                      held: int) -> ScalingEvent | None:
    with transaction.atomic():
        policy = (ScalingPolicy.objects.select_for_update().select_related("deployment")
                  .filter(pk=policy_id).first())
        if policy is None:
            return None
        deployment = policy.deployment
        decision = _decide(policy, ScalingInputs(now_s, deployment.replicas, samples, held))
        policy.state = decision.state.to_dict()
        policy.save(update_fields=["state"])
        if decision.desired_replicas == deployment.replicas:
            return None
        event = _record_change(deployment, decision, len(samples), held, policy.metric)
    reconcile_deployment(deployment.pk)  # places or drains replicas, bumps routes if so
    return event


def _decide(policy: ScalingPolicy, inputs: ScalingInputs) -> Decision:
    try:
        state = ScalingState.from_dict(policy.state or {})
    except ValueError:
        log.warning("scaling state of %s unreadable; starting afresh", policy.deployment.name)
        state = ScalingState()
    return decide(config_of(policy), inputs, state)


def _record_change(deployment: Deployment, decision: Decision, replicas_reporting: int,
                   held: int, metric: str) -> ScalingEvent:
    from_replicas = deployment.replicas
    Deployment.objects.filter(pk=deployment.pk).update(replicas=decision.desired_replicas)
    deployment.replicas = decision.desired_replicas
    # The revision timeline shows every change of the count, the auto-scaler's too.
    record_revision(deployment, f"auto-scaler: {from_replicas} → {decision.desired_replicas}"
                                f" replicas ({decision.reason})", None)
    event = ScalingEvent.objects.create(
        deployment=deployment, from_replicas=from_replicas,
        to_replicas=decision.desired_replicas, reason=decision.reason, panic=decision.panic,
        inputs={"metric": metric,
                "stable_demand": round(decision.stable_demand, 3),
                "panic_demand": round(decision.panic_demand, 3),
                "replicas_reporting": replicas_reporting, "held_requests": held})
    log.info("%s: %s", deployment.name, decision.reason)
    transaction.on_commit(lambda: _publish(event))
    return event


def _publish(event: ScalingEvent) -> None:
    """Publish the decision as a live event (the dashboards show it; never fails the tick)."""
    try:
        live_events.publish(DeploymentScaled(
            deployment_id=event.deployment_id, deployment_name=event.deployment.name,
            at=event.created_at.isoformat(), from_replicas=event.from_replicas,
            to_replicas=event.to_replicas, reason=event.reason))
    except Exception:  # reading the deployment's name may fail
        log.exception("could not publish scaling event %s", event.pk)
