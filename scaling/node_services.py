"""The auto-scaler's node tick: read the fleet, plan (scaling/nodeplan.py), let the provider act.

Called from the auto-scaler's Celery tick. Two queries read the state; the plan is
pure; the provider starts or stops GPU servers. A released node is stopped with
SIGTERM (or the provider's equivalent): its agent drains and deregisters, so a replica
placed on it in the instant between the read and the stop is moved, never lost.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import replace
from datetime import datetime

from django.db.models import Count, Max, Q
from django.utils import timezone

from scaling.nodeplan import (
    NodeInfo,
    NodePlan,
    active_cost_per_hour,
    fits_a_new_node,
    plan_nodes,
    replicas_per_new_node,
)
from scaling.providers import NodeProvider, ProviderError, get_provider
from serving.models import Gpu, Node, NodeStatus, Replica, ReplicaState

log = logging.getLogger(__name__)
ON_NODE_STATES = (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.DRAINING)
_last_reason: list[str] = [""]  # log a standing situation once, not every tick


def tick_nodes(now: datetime | None = None, provider: NodeProvider | None = None) -> NodePlan:
    """Plan the fleet for this tick, have the provider carry it out; return the plan."""
    now = now or timezone.now()
    provider = provider or get_provider()
    managed = provider.managed_names()
    nodes = node_infos(managed)
    joined = {node.name for node in nodes if node.managed}
    devices = node_devices(managed)
    pending, memory_bytes, unfit = pending_replicas(devices)
    memory = [[size for _, size in node] for node in devices]
    per_node = replicas_per_new_node(memory, memory_bytes, pending) if pending else 1
    plan = plan_nodes(nodes, pending, len(managed - joined), provider.bounds, now.timestamp(),
                      per_node, unfit)
    plan = _carry_out(plan, provider, counted=len(managed))
    if plan.changes or plan.reason != _last_reason[0]:
        log.info("nodes (%s provider): %s", provider.name, plan.reason)
        _last_reason[0] = plan.reason
    return plan


def node_infos(managed_names: set[str]) -> list[NodeInfo]:
    """Return the live nodes (not offline) as the plan sees them, in one query."""
    rows = (Node.objects.exclude(status=NodeStatus.OFFLINE)
            .annotate(active=Count("replicas", filter=Q(replicas__state__in=ON_NODE_STATES)),
                      last_replica_change=Max("replicas__state_changed_at"))
            .values_list("pk", "name", "status", "cost_per_hour", "active", "status_changed_at",
                         "last_replica_change"))
    return [NodeInfo(id=pk, name=name, managed=name in managed_names, status=status,
                     active_replicas=active, cost_per_hour=cost,
                     idle_since_s=max(filter(None, (changed, replica_change))).timestamp())
            for pk, name, status, cost, active, changed, replica_change in rows]


def pending_replicas(devices: list[list[tuple[str, int]]]) -> tuple[int, int, int]:
    """Return how many wanted replicas fit on no node now but would on a new one, the most
    memory one of those needs, and how many fit no kind of node at all."""
    rows = Replica.objects.filter(state=ReplicaState.PENDING, desired=True,
                                  node__isnull=True).values_list(
        "deployment__memory_bytes", "deployment__device").order_by().annotate(count=Count("pk"))
    fitting, memory_bytes, unfit = 0, 0, 0
    for memory, device, count in rows:
        if fits_a_new_node(devices, memory, device):
            fitting, memory_bytes = fitting + count, max(memory_bytes, memory)
        else:
            unfit += count
    return fitting, memory_bytes, unfit


def node_devices(managed_names: set[str]) -> list[list[tuple[str, int]]]:
    """Return each live node's devices as (kind, memory bytes): of the provider's nodes, if
    it has any (a new node is one of those)."""
    by_node: dict[tuple[int, str], list[tuple[str, int]]] = defaultdict(list)
    for node_id, name, kind, memory_bytes in Gpu.objects.filter(
            node__status__in=[NodeStatus.READY, NodeStatus.DRAINING]).values_list(
            "node_id", "node__name", "kind", "memory_total_bytes"):
        by_node[node_id, name].append((kind, memory_bytes))
    managed = [devices for (_, name), devices in by_node.items() if name in managed_names]
    return managed or list(by_node.values())


def live_cost_per_hour() -> float:
    """Return what the fleet costs per hour now: the nodes that hold replicas."""
    return active_cost_per_hour(node_infos(set()))


def _carry_out(plan: NodePlan, provider: NodeProvider, counted: int) -> NodePlan:
    """Start and stop through the provider; return the plan with what it could not do."""
    reason = plan.reason
    try:
        started = provider.start_nodes(plan.add, counted=counted) if plan.add else []
    except ProviderError as error:  # e.g. no admin to own a join token: say so, go on
        started, reason = [], f"{reason}; {provider.name} provider failed: {error}"
    stopped = [name for name in plan.release if provider.stop_node(name)]
    if started:
        reason += f"; started {', '.join(started)}"
    if len(started) < plan.add:
        hint = ": join GPU servers with a token" if provider.name == "static" else ""
        reason += f"; unmet: {plan.add - len(started)} nodes not added ({provider.name}{hint})"
    if stopped:
        reason += f"; stopping {', '.join(stopped)}"
    return replace(plan, reason=reason, unmet_nodes=plan.unmet_nodes + plan.add - len(started))
