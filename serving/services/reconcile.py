"""Reconcile: create, place and retire replicas until each target version has its count.

Targets: the primary version gets every replica, or, with a canary split, each version
with a positive weight gets its share (at least one). Replicas of versions no longer
targeted are retired only once every target version has all its replicas ready, so a
roll to a new version never leaves the endpoint without a ready replica.

Ready replicas on an offline node are stand-ins: they count toward nothing (replacements
are placed elsewhere), but they keep serving until each version has its count ready
elsewhere; then they are released. If their node comes back first, they count again and
the surplus (replacements not ready yet go first) is scaled back.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from registry.models import Alias, ModelVersion
from serving import live
from serving.models import (
    ACTIVE_REPLICA_STATES,
    Deployment,
    Node,
    NodeStatus,
    Replica,
    ReplicaState,
)
from serving.placement import (
    DeviceRoom,
    NodeView,
    ReplicaNeed,
    ReplicaView,
    place_replicas_explained,
    removal_order,
)
from serving.services import reachability
from serving.services.revisions import record_revision
from swarm_portal import live_events
from swarm_portal.live_events import ReplicasChanged
from swarm_protocol.agent_messages import DesiredReplica

log = logging.getLogger(__name__)
# A deployment whose replicas keep failing is not restarted faster than this.
FAILURE_BACKOFF = (3, timedelta(seconds=60))
NODE_LOSS_ERRORS = ("node missed its heartbeats", "node removed", "node deregistered")


def target_counts(deployment: Deployment) -> dict[int, int]:
    """Return {version id: replica count} the deployment wants now."""
    if not deployment.traffic:
        return {deployment.version_id: deployment.replicas}
    weights = {int(number): float(weight) for number, weight in deployment.traffic.items()
               if float(weight) > 0}
    ids = dict(ModelVersion.objects.filter(model_id=deployment.model_id,
                                           number__in=weights).values_list("number", "pk"))
    total = sum(weights.values())
    return {ids[number]: (0 if deployment.replicas == 0 else
                          max(1, round(deployment.replicas * weight / total)))
            for number, weight in weights.items() if number in ids}


def reconcile_deployments_of(deployment_ids: set[int], now: datetime | None = None) -> None:
    for deployment_id in sorted(deployment_ids):
        reconcile_deployment(deployment_id, now)


def reconcile_all(now: datetime | None = None) -> None:
    """Reconcile every deployment (the periodic safety net; also finishes deletions)."""
    reconcile_deployments_of(set(Deployment.objects.values_list("pk", flat=True)), now)


def reconcile_deployment(deployment_id: int, now: datetime | None = None) -> None:
    """Create or remove replicas until every target version has its count."""
    now = now or timezone.now()
    with transaction.atomic():
        deployment = (Deployment.objects.select_for_update().filter(pk=deployment_id)
                      .first())
        if deployment is None:
            return
        released = _release_unwanted_on_offline_nodes(deployment_id, now)
        if (not deployment.deleting and _reconcile_locked(deployment, now)) or released:
            live.bump_routes_on_commit()
            live_events.publish(ReplicasChanged((deployment_id,)))
    if deployment.deleting:
        delete_if_drained(deployment_id)


def _release_unwanted_on_offline_nodes(deployment_id: int, now: datetime) -> bool:
    """Give up replicas retired while their node is offline: no agent is there to drain
    them (if it comes back, it is told to stop them), and a deletion must not wait."""
    return bool(Replica.objects.filter(
        deployment_id=deployment_id, desired=False, node__status=NodeStatus.OFFLINE).exclude(
        state__in=[ReplicaState.FAILED, ReplicaState.STOPPED]).update(
        state=ReplicaState.FAILED, error=NODE_LOSS_ERRORS[0], state_changed_at=now))


def delete_if_drained(deployment_id: int) -> None:
    """Delete a deployment being deleted once no replica of it runs anywhere."""
    busy = Replica.objects.filter(deployment_id=deployment_id, node__isnull=False).exclude(
        state__in=[ReplicaState.FAILED, ReplicaState.STOPPED]).exists()
    if not busy:
        Deployment.objects.filter(pk=deployment_id, deleting=True).delete()


def _reconcile_locked(deployment: Deployment, now: datetime) -> bool:
    """Do one reconcile pass; return whether any replica changed."""
    _follow_alias(deployment)
    targets = target_counts(deployment)
    replicas = list(Replica.objects.filter(deployment=deployment, desired=True,
                                           state__in=ACTIVE_REPLICA_STATES)
                    .annotate(node_status=F("node__status")))
    wanted = [r for r in replicas if r.node_status != NodeStatus.OFFLINE]
    stand_ins = [r for r in replicas if r.node_status == NodeStatus.OFFLINE]
    changed = _retire_old_versions(targets, wanted + stand_ins, wanted)
    spread = Counter(r.node_id for r in wanted if r.node_id is not None)
    backing_off = _backing_off(deployment, now)
    for version_id, count in targets.items():
        current = [r for r in wanted if r.version_id == version_id]
        missing = count - len(current)
        if (missing > 0 or any(r.node_id is None for r in current)) and not backing_off:
            changed |= _add_replicas(deployment, version_id, max(missing, 0), current, spread)
        elif missing < 0:
            _remove_replicas(current, -missing)
            changed = True
    return _release_stand_ins(targets, wanted, stand_ins, now) or changed


def _release_stand_ins(targets: dict[int, int], wanted: list[Replica],
                       stand_ins: list[Replica], now: datetime) -> bool:
    """Release the offline node's replicas of each version that is fully ready elsewhere."""
    ready = Counter(r.version_id for r in wanted if r.state == ReplicaState.READY)
    done = [r.pk for r in stand_ins
            if r.version_id in targets and ready[r.version_id] >= targets[r.version_id]]
    if done:
        Replica.objects.filter(pk__in=done).update(
            state=ReplicaState.FAILED, desired=False, error=NODE_LOSS_ERRORS[0],
            state_changed_at=now)
    return bool(done)


def _follow_alias(deployment: Deployment) -> None:
    if not deployment.alias_name:
        return
    alias = Alias.objects.filter(model_id=deployment.model_id,
                                 name=deployment.alias_name).first()
    if alias and alias.version_id != deployment.version_id:
        log.info("deployment %s follows %s to version id %s", deployment.name,
                 deployment.alias_name, alias.version_id)
        deployment.version_id = alias.version_id
        deployment.traffic = {}
        deployment.save(update_fields=["version", "traffic"])
        record_revision(deployment, f"alias {deployment.alias_name} moved", None)


def _retire_old_versions(targets: dict[int, int], replicas: list[Replica],
                         counted: list[Replica]) -> bool:
    """Drain replicas of untargeted versions once every target version is fully ready."""
    old = [r.pk for r in replicas if r.version_id not in targets]
    if not old:
        return False
    ready = Counter(r.version_id for r in counted if r.state == ReplicaState.READY)
    if all(ready[version_id] >= count for version_id, count in targets.items()):
        Replica.objects.filter(pk__in=old).update(desired=False)
        return True
    return False


def _backing_off(deployment: Deployment, now: datetime) -> bool:
    count, window = FAILURE_BACKOFF
    recent = Replica.objects.filter(deployment=deployment, state=ReplicaState.FAILED,
                                    state_changed_at__gte=now - window).exclude(
        error__in=NODE_LOSS_ERRORS)
    return recent.count() >= count


def _add_replicas(deployment: Deployment, version_id: int, count: int,
                  current: list[Replica], spread: Counter[int | None]) -> bool:
    """Place `count` more replicas and retry the pending ones; a replica that fits nowhere
    stays PENDING with the reason on its row (Replica.error)."""
    unplaced = [r for r in current if r.node_id is None]
    count += len(unplaced)
    sha256 = ModelVersion.objects.values_list("sha256", flat=True).get(pk=version_id)
    need = ReplicaNeed(memory_bytes=deployment.memory_bytes, device=deployment.device,
                       sha256=sha256)
    placements, reason = place_replicas_explained(node_views(spread), need, count)
    reason = reason[:2000]
    if unplaced and not placements:
        # Still no room anywhere: keep the pending rows, with today's reason.
        return _note_pending_reason(deployment, unplaced, reason)
    Replica.objects.filter(pk__in=[r.pk for r in unplaced]).delete()
    new = [Replica(deployment=deployment, version_id=version_id, node_id=p.node_id,
                   gpu_index=p.gpu_index, state=ReplicaState.STARTING) for p in placements]
    new += [Replica(deployment=deployment, version_id=version_id, state=ReplicaState.PENDING,
                    error=reason) for _ in range(count - len(placements))]
    Replica.objects.bulk_create(new)
    spread.update(p.node_id for p in placements)
    if reason:
        log.info("deployment %s: %d replicas pending: %s", deployment.name,
                 count - len(placements), reason)
    return True


def _note_pending_reason(deployment: Deployment, unplaced: list[Replica], reason: str) -> bool:
    """Write a changed reason on pending rows; return whether any row changed."""
    stale = [r.pk for r in unplaced if r.error != reason]
    if not stale:
        return False
    Replica.objects.filter(pk__in=stale).update(error=reason)
    log.info("deployment %s: %d replicas pending: %s", deployment.name, len(unplaced), reason)
    return True


def _remove_replicas(current: list[Replica], count: int) -> None:
    node_ids = [r.node_id for r in current if r.node_id]
    try:
        figures = live.nodes_figures(node_ids)
    except live.CacheUnavailable:
        figures = {}  # in-flight counts only order the removal; remove without them
    costs = dict(Node.objects.filter(pk__in=node_ids).values_list("pk", "cost_per_hour"))
    views = [ReplicaView(r.pk, costs.get(r.node_id, 0.0), _in_flight(figures, r),
                         r.state == ReplicaState.READY) for r in current]
    doomed = removal_order(views)[:count]
    Replica.objects.filter(pk__in=doomed, node__isnull=True).delete()
    Replica.objects.filter(pk__in=doomed).update(desired=False)


def _in_flight(figures: dict[int, dict[str, Any]], replica: Replica) -> int:
    for status in figures.get(replica.node_id or -1, {}).get("replicas", []):
        if status.get("replica_id") == replica.pk:
            return int(status.get("in_flight", 0))
    return 0


def node_views(spread: Counter[int | None]) -> list[NodeView]:
    """Return ready nodes with the room left on each device after their replicas.

    A node behind NAT (reach mode tunnel) counts only while some gateway accepts tunnels:
    otherwise no gateway could send its replicas a request, so placing one there would
    leave a "ready" replica that never gets traffic.
    """
    ready = Node.objects.filter(status=NodeStatus.READY)
    if not reachability.tunnel_urls():
        ready = ready.exclude(reach_mode=reachability.TUNNEL)
    nodes = list(ready.prefetch_related("gpus"))
    reserved: Counter[tuple[int, int | None]] = Counter()
    for node_id, gpu_index, memory in Replica.objects.filter(
            node__in=nodes, desired=True, state__in=ACTIVE_REPLICA_STATES).values_list(
            "node_id", "gpu_index", "deployment__memory_bytes"):
        reserved[(node_id, gpu_index)] += memory
    views = []
    for node in nodes:
        devices = tuple(
            DeviceRoom(gpu.index, gpu.kind, gpu.memory_total_bytes
                       - reserved[(node.pk, gpu.index if gpu.kind == "gpu" else None)],
                       gpu.memory_total_bytes)
            for gpu in node.gpus.all())
        views.append(NodeView(node.pk, node.cost_per_hour, devices, spread.get(node.pk, 0),
                              frozenset(node.cached_artifacts)))
    return views


def desired_for_node(node: Node) -> list[DesiredReplica]:
    """Return the replicas the portal wants running on this node."""
    replicas = Replica.objects.filter(node=node, desired=True).exclude(
        state__in=[ReplicaState.FAILED, ReplicaState.STOPPED]).select_related(
        "deployment", "version", "version__model")
    return [DesiredReplica(
        replica_id=r.pk, model_name=r.deployment.name, version=r.version.number,
        sha256=r.version.sha256, size_bytes=r.version.size_bytes, format=r.version.format,
        signature=r.version.signature, max_batch_size=r.deployment.max_batch_size,
        max_queue_delay_ms=r.deployment.max_queue_delay_ms, device=r.device,
        threads=r.deployment.threads, steps=r.version.steps) for r in replicas]
