"""The dashboards' read side: ORM rows and cached figures turned into plain rows for pages.

Every function runs a fixed number of queries, whatever the number of nodes, models or
deployments (asserted in tests/test_dashboards_queries.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Count, Max, Min, Q
from django.utils import timezone

from dashboards import figures, health, history
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
class GpuProcessRow:
    pid: int
    memory_used_bytes: int | None  # None: NVML could not say
    replica_id: int | None  # None: not a replica of this node's agent
    deployment: str = ""  # filled by the fleet page from the node's replicas


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
    processes: list[GpuProcessRow] = field(default_factory=list)


@dataclass
class ReplicaRow:
    id: int
    deployment: str
    version: int
    state: str
    port: int | None
    gpu_index: int | None  # None: on the CPU


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
    replica_rows: list[ReplicaRow] = field(default_factory=list)  # filled by the fleet page

    @property
    def active(self) -> bool:
        """A ready node that runs replicas: it costs money (an idle node costs nothing)."""
        return self.status == NodeStatus.READY and self.replicas > 0


@dataclass
class Summary:
    nodes: int
    ready_nodes: int
    active_nodes: int  # ready and holding replicas: never more than ready_nodes
    gpus: int  # GPU devices only
    cpus: int  # CPU devices (nodes without a GPU serve on their CPU)
    mean_utilization_pct: float | None  # over GPUs only: a CPU's load is not GPU use
    mean_cpu_load_pct: float | None
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
                           seen.get("temperature_c"), seen.get("power_w"),
                           [GpuProcessRow(p.get("pid", 0), p.get("memory_used_bytes"),
                                          p.get("replica_id"))
                            for p in seen.get("processes") or []]))
    return NodeRow(node.pk, node.name, node.address, node.status, node.labels,
                   node.cost_per_hour, node.replica_count, gpus,
                   (figures_ or {}).get("at_s"))


def with_replicas(nodes: list[NodeRow]) -> list[NodeRow]:
    """Give each node its replica rows and name the deployment of each GPU process that is
    one of them (1 query)."""
    replicas = node_replicas([node.id for node in nodes])
    for node in nodes:
        node.replica_rows = replicas.get(node.id, [])
        deployment_of = {r.id: r.deployment for r in node.replica_rows}
        for gpu in node.gpus:
            for process in gpu.processes:
                process.deployment = deployment_of.get(process.replica_id or 0, "")
    return nodes


def node_replicas(node_ids: list[int]) -> dict[int, list[ReplicaRow]]:
    """Return {node id: its replicas that are not stopped, by deployment} (1 query)."""
    rows: dict[int, list[ReplicaRow]] = {}
    replicas = (Replica.objects.filter(node_id__in=node_ids).exclude(state=ReplicaState.STOPPED)
                .order_by("deployment__name", "pk")
                .values_list("node_id", "pk", "deployment__name", "version__number", "state",
                             "port", "gpu_index"))
    for node_id, pk, deployment, version, state, port, gpu_index in replicas:
        rows.setdefault(node_id, []).append(
            ReplicaRow(pk, deployment, version, state, port, gpu_index))
    return rows


def summary(nodes: list[NodeRow], histories: dict[int, list[Any]]) -> Summary:
    """Return the overview's totals from the fleet rows and the chart history."""
    rps = sum(rate.requests_per_s for samples in histories.values()
              for rate in figures.latest_rates(samples).values())
    devices = [g for n in nodes for g in n.gpus]
    return Summary(
        nodes=len(nodes), ready_nodes=sum(n.status == NodeStatus.READY for n in nodes),
        active_nodes=sum(n.active for n in nodes),
        gpus=sum(g.kind == "gpu" for g in devices), cpus=sum(g.kind != "gpu" for g in devices),
        mean_utilization_pct=_mean_utilization(nodes, "gpu"),
        mean_cpu_load_pct=_mean_utilization(nodes, "cpu"),
        requests_per_s=round(rps, 2),
        cost_per_hour=round(sum(n.cost_per_hour for n in nodes if n.active), 2))


def _mean_utilization(nodes: list[NodeRow], kind: str) -> float | None:
    """Return the mean utilisation (%) of the reporting devices of one kind, or None."""
    utils = [g.utilization_pct for n in nodes if n.status != NodeStatus.OFFLINE
             for g in n.gpus if g.kind == kind and g.utilization_pct is not None]
    return round(sum(utils) / len(utils), 1) if utils else None


def device_kinds(nodes: list[NodeRow]) -> dict[str, dict[str, str]]:
    """Return {node id: {device index: "gpu" or "cpu"}} for the browser's live sums."""
    return {str(n.id): {str(g.index): g.kind for g in n.gpus} for n in nodes}


def node_histories(node_ids: list[int],
                   range_name: str = history.DEFAULT_RANGE) -> dict[int, list[Any]]:
    return history.histories(node_ids, range_name)


def recent_events(limit: int = RECENT_EVENTS) -> list[EventRow]:
    """Return the latest scaling events, node changes and replica changes, newest first."""
    from scaling.models import ScalingEvent

    rows = [EventRow(e.created_at, "scaling", f"{e.deployment.name}: {e.from_replicas} → "
                     f"{e.to_replicas} replicas ({e.reason})")
            for e in ScalingEvent.objects.select_related("deployment")[:limit]]
    rows += [EventRow(at, "node", f"node {name} is {status}") for name, status, at in
             Node.objects.order_by("-status_changed_at")
             .values_list("name", "status", "status_changed_at")[:limit]]
    rows += [EventRow(at, "replica", replica_event_text(name, pk, state, error))
             for pk, name, state, error, at in Replica.objects.order_by("-state_changed_at")
             .values_list("pk", "deployment__name", "state", "error", "state_changed_at")[:limit]]
    return sorted(rows, key=lambda row: row.at, reverse=True)[:limit]


def replica_event_text(deployment: str, replica_id: int, state: str, error: str) -> str:
    """Return "<deployment> replica #<id> is <state>", with the reason when it has one."""
    text = f"{deployment} replica #{replica_id} is {state}"
    return f"{text}: {error[:200]}" if error else text


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
    facts: health.ReplicaFacts = field(default_factory=health.ReplicaFacts)
    health: health.Health = field(default_factory=lambda: health.Health(health.OK))


def deployment_rows(now: datetime | None = None) -> list[DeploymentRow]:
    """Return every deployment with its replicas per version and state (2 queries)."""
    deployments = Deployment.objects.select_related("model", "version", "scaling_policy")
    rows = {d.pk: DeploymentRow(d.pk, d.name, d.model.name, d.version.number, d.alias_name,
                                d.replicas, d.traffic, policy=_policy_or_none(d))
            for d in deployments}
    recent = Q(state_changed_at__gte=(now or timezone.now())
               - timedelta(seconds=health.FAILED_RECENTLY_S))
    counts = (Replica.objects.filter(deployment_id__in=rows).exclude(state=ReplicaState.STOPPED)
              .values_list("deployment_id", "version__number", "state")
              .annotate(n=Count("id"), recent=Count("id", filter=recent),
                        since=Min("state_changed_at"), reason=Max("error")).order_by())
    for deployment_id, version, state, n, recent_n, since, reason in counts:
        row = rows[deployment_id]
        by_state = row.states.setdefault(str(version), {})
        by_state[state] = by_state.get(state, 0) + n
        row.facts = _add_facts(row.facts, state, n, recent_n, since, reason)
    return list(rows.values())


def _add_facts(facts: health.ReplicaFacts, state: str, count: int, recent: int,
               since: datetime, reason: str) -> health.ReplicaFacts:
    if state == ReplicaState.FAILED:
        return replace(facts, failed_recently=facts.failed_recently + recent)
    if state == ReplicaState.PENDING:
        oldest = min(filter(None, (facts.pending_since_s, since.timestamp())))
        return replace(facts, pending=facts.pending + count, pending_since_s=oldest,
                       pending_reason=facts.pending_reason or reason)
    return facts


def with_health(rows: list[DeploymentRow], now: datetime | None = None) -> list[DeploymentRow]:
    """Judge each row's health from its replica facts and its latest error rate."""
    now_s = (now or timezone.now()).timestamp()
    for row in rows:
        row.health = health.deployment_health(row.facts, row.figures.get("error_rate"), now_s)
    return rows


def _policy_or_none(deployment: Deployment) -> Any:
    try:
        return deployment.scaling_policy
    except Deployment.scaling_policy.RelatedObjectDoesNotExist:
        return None


def replica_deployments(deployment_ids: list[int] | None = None,
                        stopped_too: bool = False) -> dict[int, int]:
    """Return {replica id: deployment id} for replicas that may still report figures (with
    `stopped_too`, also those gone since: a 24 h chart still counts their traffic)."""
    replicas = (Replica.objects.all() if stopped_too
                else Replica.objects.exclude(state=ReplicaState.STOPPED))
    if deployment_ids is not None:
        replicas = replicas.filter(deployment_id__in=deployment_ids)
    return dict(replicas.values_list("pk", "deployment_id"))


def deployment_series(deployment_ids: list[int] | None = None,
                      version_of: dict[int, int] | None = None,
                      range_name: str = history.DEFAULT_RANGE) -> dict[int, figures.Series]:
    """Return the chart history per deployment (2 queries and one cache read); with
    `version_of` ({replica id: version}), per-version request rates during a canary."""
    node_ids = list(Node.objects.values_list("pk", flat=True))
    longer = range_name != history.DEFAULT_RANGE
    return figures.deployment_series(node_histories(node_ids, range_name),
                                     replica_deployments(deployment_ids, stopped_too=longer),
                                     history.RANGES[range_name].step_s, version_of)


def latest_figures(series: dict[int, figures.Series]) -> dict[int, dict[str, Any]]:
    """Return the newest point of each deployment's series."""
    return {pk: {name: values[-1] for name, values in s.lines.items()}
            for pk, s in series.items() if s.t_s}

