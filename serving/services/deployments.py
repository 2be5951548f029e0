"""Deployments: create, scale by hand, delete, and reconcile replicas with placement."""

from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from registry.models import Alias, Model, ModelVersion
from serving import live
from serving.agent.protocol import DesiredReplica
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
    place_replicas,
    removal_order,
)
from swarm_portal.errors import Conflict, ServiceError

log = logging.getLogger(__name__)
MAX_REPLICAS = 256
# A deployment whose replicas keep failing is not restarted faster than this.
FAILURE_BACKOFF = (3, timedelta(seconds=60))


def resolve_version(model: Model, version_number: int | None, alias_name: str) -> ModelVersion:
    """Return the version named by number or alias (exactly one of them)."""
    if bool(version_number) == bool(alias_name):
        raise ServiceError("give either version or alias, not both or neither")
    if alias_name:
        alias = Alias.objects.select_related("version").filter(model=model,
                                                               name=alias_name).first()
        if alias is None:
            raise ServiceError(f"{model.name} has no alias {alias_name!r}")
        return alias.version
    version = model.versions.filter(number=version_number).first()
    if version is None:
        raise ServiceError(f"{model.name} has no version {version_number}")
    return version


def do_create_deployment(*, name: str, model: Model, version_number: int | None,
                         alias_name: str, user: Any, **settings_: Any) -> Deployment:
    """Create a deployment and place its replicas."""
    version = resolve_version(model, version_number, alias_name)
    try:
        with transaction.atomic():
            deployment = Deployment.objects.create(name=name, model=model, version=version,
                                                   alias_name=alias_name, created_by=user,
                                                   **settings_)
    except IntegrityError:
        raise Conflict(f"a deployment named {name!r} already exists") from None
    reconcile_deployment(deployment.pk)
    return deployment


def do_scale_deployment(deployment: Deployment, replicas: int) -> Deployment:
    """Set the desired replica count by hand and reconcile."""
    if not 0 <= replicas <= MAX_REPLICAS:
        raise ServiceError(f"replicas must be between 0 and {MAX_REPLICAS}")
    Deployment.objects.filter(pk=deployment.pk).update(replicas=replicas)
    reconcile_deployment(deployment.pk)
    deployment.refresh_from_db()
    return deployment


def do_delete_deployment(deployment: Deployment) -> None:
    """Drain every replica, then forget the deployment once they are gone."""
    with transaction.atomic():
        deployment.replica_set.update(desired=False)
        Deployment.objects.filter(pk=deployment.pk).update(replicas=0, deleting=True)
    _delete_if_drained(deployment.pk)


def _delete_if_drained(deployment_id: int) -> None:
    """Delete a deployment being deleted once no replica of it runs anywhere."""
    busy = Replica.objects.filter(deployment_id=deployment_id, node__isnull=False).exclude(
        state__in=[ReplicaState.FAILED, ReplicaState.STOPPED]).exists()
    if not busy:
        Deployment.objects.filter(pk=deployment_id, deleting=True).delete()


def reconcile_deployments_of(deployment_ids: set[int], now: datetime | None = None) -> None:
    for deployment_id in sorted(deployment_ids):
        reconcile_deployment(deployment_id, now)


def reconcile_all(now: datetime | None = None) -> None:
    """Reconcile every deployment (the periodic safety net; also finishes deletions)."""
    reconcile_deployments_of(set(Deployment.objects.values_list("pk", flat=True)), now)


def reconcile_deployment(deployment_id: int, now: datetime | None = None) -> None:
    """Create or remove replicas until the current version has the desired count."""
    now = now or timezone.now()
    with transaction.atomic():
        deployment = (Deployment.objects.select_for_update().select_related("version")
                      .filter(pk=deployment_id).first())
        if deployment is None:
            return
        if not deployment.deleting:
            _reconcile_locked(deployment, now)
    if deployment.deleting:
        _delete_if_drained(deployment_id)


def _reconcile_locked(deployment: Deployment, now: datetime) -> None:
    _follow_alias(deployment)
    wanted = list(Replica.objects.filter(deployment=deployment, desired=True,
                                         state__in=ACTIVE_REPLICA_STATES))
    current = [r for r in wanted if r.version_id == deployment.version_id]
    _retire_old_versions(deployment, wanted, current)
    missing = deployment.replicas - len(current)
    unplaced = any(r.node_id is None for r in current)
    if (missing > 0 or unplaced) and not _backing_off(deployment, now):
        _add_replicas(deployment, max(missing, 0), current)
    elif missing < 0:
        _remove_replicas(deployment, current, -missing)


def _follow_alias(deployment: Deployment) -> None:
    if not deployment.alias_name:
        return
    alias = Alias.objects.filter(model_id=deployment.model_id,
                                 name=deployment.alias_name).first()
    if alias and alias.version_id != deployment.version_id:
        log.info("deployment %s follows %s to version id %s", deployment.name,
                 deployment.alias_name, alias.version_id)
        deployment.version_id = alias.version_id
        deployment.save(update_fields=["version"])
        deployment.refresh_from_db()


def _retire_old_versions(deployment: Deployment, wanted: Any, current: list[Replica]) -> None:
    """Old-version replicas go only once the new version has all its replicas ready."""
    ready_new = sum(1 for r in current if r.state == ReplicaState.READY)
    if ready_new >= deployment.replicas:
        old = [r.pk for r in wanted if r.version_id != deployment.version_id]
        Replica.objects.filter(pk__in=old).update(desired=False)


def _backing_off(deployment: Deployment, now: datetime) -> bool:
    count, window = FAILURE_BACKOFF
    recent = Replica.objects.filter(deployment=deployment, state=ReplicaState.FAILED,
                                    state_changed_at__gte=now - window).exclude(
        error__in=["node missed its heartbeats", "node removed", "node deregistered"])
    return recent.count() >= count


def _add_replicas(deployment: Deployment, count: int, current: list[Replica]) -> None:
    placed_pending = [r for r in current if r.node_id is None]
    Replica.objects.filter(pk__in=[r.pk for r in placed_pending]).delete()
    count += len(placed_pending)
    spread = Counter(r.node_id for r in current if r.node_id is not None)
    need = ReplicaNeed(memory_bytes=deployment.memory_bytes, device=deployment.device,
                       sha256=deployment.version.sha256)
    placements = place_replicas(node_views(spread), need, count)
    new = [Replica(deployment=deployment, version_id=deployment.version_id, node_id=p.node_id,
                   gpu_index=p.gpu_index, state=ReplicaState.STARTING) for p in placements]
    new += [Replica(deployment=deployment, version_id=deployment.version_id,
                    state=ReplicaState.PENDING) for _ in range(count - len(placements))]
    Replica.objects.bulk_create(new)


def _remove_replicas(deployment: Deployment, current: list[Replica], count: int) -> None:
    figures = live.nodes_figures([r.node_id for r in current if r.node_id])
    costs = dict(Node.objects.filter(pk__in=[r.node_id for r in current if r.node_id])
                 .values_list("pk", "cost_per_hour"))
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
    """Return ready nodes with the room left on each device after their replicas."""
    nodes = list(Node.objects.filter(status=NodeStatus.READY).prefetch_related("gpus"))
    reserved: Counter[tuple[int, int | None]] = Counter()
    for node_id, gpu_index, memory in Replica.objects.filter(
            node__in=nodes, desired=True, state__in=ACTIVE_REPLICA_STATES).values_list(
            "node_id", "gpu_index", "deployment__memory_bytes"):
        reserved[(node_id, gpu_index)] += memory
    views = []
    for node in nodes:
        devices = tuple(
            DeviceRoom(gpu.index, gpu.kind, gpu.memory_total_bytes
                       - reserved[(node.pk, gpu.index if gpu.kind == "gpu" else None)])
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
        threads=r.deployment.threads) for r in replicas]
