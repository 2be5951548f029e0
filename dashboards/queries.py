"""The dashboards' read side: ORM rows and cached figures turned into plain rows for pages.

Every function runs a fixed number of queries, whatever the number of nodes, models or
deployments (asserted in tests/test_dashboards_queries.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db.models import Count, Q

from dashboards import figures, history
from serving import live
from serving.models import (
    ACTIVE_REPLICA_STATES,
    Deployment,
    Node,
    NodeStatus,
    Replica,
    ReplicaState,
)

RECENT_EVENTS = 25


@dataclass
class GpuRow:
    index: int
    kind: str
    name: str
    memory_total_bytes: int
    utilization_pct: float | None = None
    memory_used_bytes: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None


@dataclass
class NodeRow:
    id: int
    name: str
    address: str
    status: str
    labels: dict[str, Any]
    cost_per_hour: float
    replicas: int
    gpus: list[GpuRow]
    heartbeat_at_s: float | None

    @property
    def active(self) -> bool:
        """A ready node that runs replicas: it costs money (an idle node costs nothing)."""
        return self.status == NodeStatus.READY and self.replicas > 0


@dataclass
class Summary:
    nodes: int
    ready_nodes: int
    active_nodes: int
    gpus: int
    mean_utilization_pct: float | None
    requests_per_s: float
    cost_per_hour: float


@dataclass
class EventRow:
    at: datetime
    kind: str
    text: str


def fleet_nodes() -> list[NodeRow]:
    """Return every node with its devices, live figures and replica count (2 queries)."""
    nodes = list(Node.objects.annotate(replica_count=Count(
        "replicas", filter=Q(replicas__desired=True,
                             replicas__state__in=ACTIVE_REPLICA_STATES)))
        .prefetch_related("gpus"))
    cached = live.nodes_figures([node.pk for node in nodes])
    return [_node_row(node, cached.get(node.pk)) for node in nodes]


def _node_row(node: Node, figures_: dict[str, Any] | None) -> NodeRow:
    devices = {d["index"]: d for d in (figures_ or {}).get("devices", [])}
    gpus = []
    for gpu in node.gpus.all():
        seen = devices.get(gpu.index, {})
        gpus.append(GpuRow(gpu.index, gpu.kind, gpu.name, gpu.memory_total_bytes,
                           seen.get("utilization_pct"), seen.get("memory_used_bytes"),
                           seen.get("temperature_c"), seen.get("power_w")))
    return NodeRow(node.pk, node.name, node.address, node.status, node.labels,
                   node.cost_per_hour, node.replica_count, gpus,
                   (figures_ or {}).get("at_s"))


def summary(nodes: list[NodeRow], histories: dict[int, list[Any]]) -> Summary:
    """Return the overview's totals from the fleet rows and the chart history."""
    utils = [g.utilization_pct for n in nodes if n.status != NodeStatus.OFFLINE
             for g in n.gpus if g.utilization_pct is not None]
    rps = sum(rate.requests_per_s for samples in histories.values()
              for rate in figures.latest_rates(samples).values())
    return Summary(
        nodes=len(nodes), ready_nodes=sum(n.status == NodeStatus.READY for n in nodes),
        active_nodes=sum(n.active for n in nodes), gpus=sum(len(n.gpus) for n in nodes),
        mean_utilization_pct=round(sum(utils) / len(utils), 1) if utils else None,
        requests_per_s=round(rps, 2),
        cost_per_hour=round(sum(n.cost_per_hour for n in nodes if n.active), 2))


def node_histories(node_ids: list[int]) -> dict[int, list[Any]]:
    return history.histories(node_ids)


def recent_events(limit: int = RECENT_EVENTS) -> list[EventRow]:
    """Return the latest scaling events, node changes and replica changes, newest first."""
    from scaling.models import ScalingEvent

    rows = [EventRow(e.created_at, "scaling", f"{e.deployment.name}: {e.from_replicas} → "
                     f"{e.to_replicas} replicas ({e.reason})")
            for e in ScalingEvent.objects.select_related("deployment")[:limit]]
    rows += [EventRow(at, "node", f"node {name} is {status}") for name, status, at in
             Node.objects.order_by("-status_changed_at")
             .values_list("name", "status", "status_changed_at")[:limit]]
    rows += [EventRow(at, "replica", f"{name} replica #{pk} is {state}")
             for pk, name, state, at in Replica.objects.order_by("-state_changed_at")
             .values_list("pk", "deployment__name", "state", "state_changed_at")[:limit]]
    return sorted(rows, key=lambda row: row.at, reverse=True)[:limit]


@dataclass
class DeploymentRow:
    id: int
    name: str
    model: str
    version: int
    alias_name: str
    desired_replicas: int
    traffic: dict[str, float]
    states: dict[str, dict[str, int]] = field(default_factory=dict)  # version -> state: count
    policy: Any = None
    figures: dict[str, float | None] = field(default_factory=dict)


def deployment_rows() -> list[DeploymentRow]:
    """Return every deployment with its replicas per version and state (2 queries)."""
    deployments = Deployment.objects.select_related("model", "version", "scaling_policy")
    rows = {d.pk: DeploymentRow(d.pk, d.name, d.model.name, d.version.number, d.alias_name,
                                d.replicas, d.traffic, policy=_policy_or_none(d))
            for d in deployments}
    counts = (Replica.objects.filter(deployment_id__in=rows).exclude(state=ReplicaState.STOPPED)
              .values_list("deployment_id", "version__number", "state")
              .annotate(n=Count("id")))
    for deployment_id, version, state, n in counts:
        by_state = rows[deployment_id].states.setdefault(str(version), {})
        by_state[state] = by_state.get(state, 0) + n
    return list(rows.values())


def _policy_or_none(deployment: Deployment) -> Any:
    try:
        return deployment.scaling_policy
    except Deployment.scaling_policy.RelatedObjectDoesNotExist:
        return None


def replica_deployments(deployment_ids: list[int] | None = None) -> dict[int, int]:
    """Return {replica id: deployment id} for replicas that may still report figures."""
    replicas = Replica.objects.exclude(state=ReplicaState.STOPPED)
    if deployment_ids is not None:
        replicas = replicas.filter(deployment_id__in=deployment_ids)
    return dict(replicas.values_list("pk", "deployment_id"))


def deployment_series(deployment_ids: list[int] | None = None) -> dict[int, figures.Series]:
    """Return the chart history per deployment (2 queries and one cache read)."""
    node_ids = list(Node.objects.values_list("pk", flat=True))
    return figures.deployment_series(node_histories(node_ids),
                                     replica_deployments(deployment_ids),
                                     history.HISTORY_STEP_S)


def latest_figures(series: dict[int, figures.Series]) -> dict[int, dict[str, Any]]:
    """Return the newest point of each deployment's series."""
    return {pk: {name: values[-1] for name, values in s.lines.items()}
            for pk, s in series.items() if s.t_s}

