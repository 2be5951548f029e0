"""Publish points: the dashboards' side of the services' live events (swarm_portal.live_events).

`on_live_event` is subscribed in DashboardsConfig.ready(); serving/ and scaling/ publish
(heartbeats, node status, replica changes, scaling decisions) without importing dashboards.
Each call returns at once; the message is built and sent after commit and never raises.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.utils import timezone

from dashboards import bus, history
from dashboards.messages import (
    LiveMessage,
    NodeFiguresMessage,
    NodeStatusMessage,
    ReplicasChangedMessage,
    ScalingEventMessage,
)
from swarm_portal.live_events import (
    DeploymentScaled,
    LiveEvent,
    NodeFigures,
    NodeStatusChanged,
    ReplicasChanged,
)


def on_live_event(event: LiveEvent) -> None:
    """Turn a service's live event into the dashboards' message(s)."""
    match event:
        case NodeFigures():
            node_figures(event.node_id, event.at_s, event.devices, event.replicas)
        case NodeStatusChanged():
            node_status(event.node_id, event.status, event.name)
        case ReplicasChanged():
            replicas_changed(event.deployment_ids)
        case DeploymentScaled():
            bus.publish(ScalingEventMessage(
                deployment_id=event.deployment_id, deployment_name=event.deployment_name,
                at=event.at, from_replicas=event.from_replicas, to_replicas=event.to_replicas,
                reason=event.reason))


def node_figures(node_id: int, at_s: float, devices: list[dict[str, Any]],
                 replicas: list[dict[str, Any]]) -> None:
    """A heartbeat arrived: keep a chart sample now and then, push the figures."""
    try:
        history.record(node_id, at_s, devices, replicas)
    except Exception:  # the cache being down must not fail a heartbeat
        bus.log.exception("recording the dashboards' history failed")
    bus.publish(NodeFiguresMessage(node_id=node_id, at_s=at_s, devices=devices,
                                   replicas=replicas))


def node_status(node_id: int, status: str | None = None, name: str = "") -> None:
    """A node's status changed (read after commit unless given, e.g. "removed")."""
    if status is not None:
        bus.publish(NodeStatusMessage(node_id=node_id, name=name, status=status,
                                      at=timezone.now().isoformat()))
        return
    bus.publish_built(lambda: _node_status_message(node_id))


def replicas_changed(deployment_ids: Iterable[int]) -> None:
    """Replicas of these deployments changed: push a snapshot of each, after commit."""
    ids = sorted(set(deployment_ids))
    if ids:
        bus.publish_built(lambda: replica_snapshots(ids))


def _node_status_message(node_id: int) -> LiveMessage | None:
    from serving.models import Node

    node = Node.objects.filter(pk=node_id).values("name", "status", "status_changed_at").first()
    if node is None:
        return NodeStatusMessage(node_id=node_id, name="", status="removed",
                                 at=timezone.now().isoformat())
    return NodeStatusMessage(node_id=node_id, name=node["name"], status=node["status"],
                             at=node["status_changed_at"].isoformat())


REPLICA_FIELDS = ("id", "deployment_id", "node_id", "node__name", "gpu_index", "version__number",
                  "state", "desired", "error")


def replica_rows(deployment_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    """Return the live replicas of the deployments, as JSON-able rows, by deployment id."""
    from serving.models import Replica, ReplicaState

    rows: dict[int, list[dict[str, Any]]] = {pk: [] for pk in deployment_ids}
    replicas = (Replica.objects.filter(deployment_id__in=deployment_ids)
                .exclude(state=ReplicaState.STOPPED).order_by("id").values(*REPLICA_FIELDS))
    for row in replicas:
        rows[row["deployment_id"]].append({
            "id": row["id"], "node_id": row["node_id"], "node": row["node__name"] or "",
            "gpu_index": row["gpu_index"], "version": row["version__number"],
            "state": row["state"], "desired": row["desired"], "error": row["error"][:200]})
    return rows


def replica_snapshots(deployment_ids: list[int]) -> list[LiveMessage]:
    """Return a ReplicasChangedMessage per deployment that still exists (two queries)."""
    from serving.models import Deployment

    deployments = Deployment.objects.filter(pk__in=deployment_ids).values_list(
        "pk", "name", "replicas")
    rows = replica_rows(deployment_ids)
    now = timezone.now().isoformat()
    return [ReplicasChangedMessage(deployment_id=pk, deployment_name=name,
                                   desired_replicas=replicas, replicas=rows[pk], at=now)
            for pk, name, replicas in deployments]
