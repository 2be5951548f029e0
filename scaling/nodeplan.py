"""Which GPU servers to add or release (pure: no Django, the clock is passed in).

`plan_nodes` looks at the nodes, the replicas that fit nowhere (PENDING) and the
nodes a provider has started that have not joined yet, and says how many nodes to
add and which provider-managed nodes to release, with a human-readable reason.
A node with no replicas is idle: it costs nothing (`active_cost_per_hour`), and a
managed one idle for `idle_release_s` goes back to the provider, beyond `min_nodes`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from serving.placement import DeviceRoom, NodeView, ReplicaNeed, place_replica

# Node statuses as serving.models.NodeStatus spells them (no Django import here).
READY, DRAINING, OFFLINE = "ready", "draining", "offline"
LIVE_STATUSES = (READY, DRAINING)
UNBOUNDED = 1_000_000


@dataclass(frozen=True)
class NodeInfo:
    """One node as the plan sees it."""

    id: int
    name: str
    managed: bool  # started by the provider (so the provider may also release it)
    status: str
    active_replicas: int  # starting, ready or draining replicas on it
    cost_per_hour: float
    idle_since_s: float  # when it last had a replica (when it joined, if it never had one)


@dataclass(frozen=True)
class NodeBounds:
    """How many provider-managed nodes may run, and when an idle one is released."""

    min_nodes: int
    max_nodes: int
    idle_release_s: float
    # A node that joined this recently without replicas has not had its placement turn
    # yet (reconcile runs every few seconds): count it as capacity on its way.
    placement_grace_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_nodes <= self.max_nodes:
            raise ValueError(f"need 0 <= min_nodes <= max_nodes, got {self.min_nodes}, "
                             f"{self.max_nodes}")
        if self.idle_release_s < 0:
            raise ValueError(f"idle_release_s must be >= 0, got {self.idle_release_s}")


@dataclass(frozen=True)
class NodePlan:
    """What to do with the fleet this tick, and why."""

    add: int
    release: tuple[str, ...]
    reason: str
    unmet_nodes: int = 0  # nodes the pending replicas need beyond what may be added

    @property
    def changes(self) -> bool:
        """Return whether the plan adds or releases anything."""
        return bool(self.add or self.release)


def active_cost_per_hour(nodes: Sequence[NodeInfo]) -> float:
    """Return the cost per hour of the nodes that hold replicas (idle ones cost nothing)."""
    return sum(node.cost_per_hour for node in nodes if _active(node))


def replicas_per_new_node(node_device_memory_bytes: Sequence[Sequence[int]],
                          replica_memory_bytes: int, pending_replicas: int) -> int:
    """Return how many pending replicas one new node should take, judged by known nodes.

    A new node is taken to look like the largest node known (the provider starts one
    kind). With no node known yet, one new node is assumed to take every pending
    replica: the next tick knows better, and a first burst never starts a node too many.
    """
    if not node_device_memory_bytes or replica_memory_bytes <= 0:
        return max(pending_replicas, 1)
    fits = max(sum(memory // replica_memory_bytes for memory in devices)
               for devices in node_device_memory_bytes)
    return max(fits, 1)


def fits_a_new_node(node_devices: Sequence[Sequence[tuple[str, int]]], memory_bytes: int,
                    device: str) -> bool:
    """Return whether a replica would fit an empty node like one of those known.

    `node_devices`: per known node, its devices as (kind "gpu"/"cpu", memory bytes). With
    no node known, assume it fits (the first node started tells). A replica that fits no
    kind of node must not start nodes: a new one of the same kind would not take it either.
    """
    if not node_devices:
        return True
    empty_nodes = [NodeView(node_id, 0.0, tuple(DeviceRoom(index, kind, memory, memory)
                                               for index, (kind, memory) in enumerate(devices)))
                   for node_id, devices in enumerate(node_devices)]
    return place_replica(empty_nodes, ReplicaNeed(memory_bytes, device)) is not None


def plan_nodes(nodes: Sequence[NodeInfo], pending_replicas: int, starting_nodes: int,
               bounds: NodeBounds, now_s: float, replicas_per_node: int = 1,
               unfit_replicas: int = 0) -> NodePlan:
    """Return how many nodes to add and which managed nodes to release, with the reason.

    `replicas_per_node`: how many pending replicas one new node takes (see above).
    `pending_replicas` counts only replicas a new node could take; `unfit_replicas` are
    pending ones no kind of node fits (they start nothing; the reason says so).
    """
    plan = _plan(nodes, pending_replicas, starting_nodes, bounds, now_s, replicas_per_node)
    if unfit_replicas:
        note = (f"{unfit_replicas} pending replicas fit no kind of node here: no node "
                f"started for them")
        return NodePlan(plan.add, plan.release, f"{plan.reason}; {note}", plan.unmet_nodes)
    return plan


def _plan(nodes: Sequence[NodeInfo], pending_replicas: int, starting_nodes: int,
          bounds: NodeBounds, now_s: float, replicas_per_node: int) -> NodePlan:
    fleet = sum(1 for node in nodes if node.managed and node.status in LIVE_STATUSES)
    fleet += starting_nodes
    for_pending = _nodes_for_pending(nodes, pending_replicas, starting_nodes, bounds, now_s,
                                     replicas_per_node)
    wanted = max(for_pending, bounds.min_nodes - fleet, 0)
    add = min(wanted, max(bounds.max_nodes - fleet, 0))
    unmet = max(for_pending - add, 0)
    if add or unmet:
        return NodePlan(add, (), _add_reason(pending_replicas, starting_nodes, fleet, add,
                                             unmet, bounds), unmet)
    if pending_replicas:
        return NodePlan(0, (), f"{pending_replicas} pending replicas: waiting for "
                               f"{starting_nodes} starting or new nodes to take them")
    release = _idle_to_release(nodes, fleet, bounds, now_s)
    if release:
        return NodePlan(0, release, f"{', '.join(release)} idle for at least "
                                    f"{bounds.idle_release_s:g} s: release (fleet {fleet} → "
                                    f"{fleet - len(release)}, min {bounds.min_nodes})")
    return NodePlan(0, (), f"steady: {fleet} managed nodes, none to add or release")


def _active(node: NodeInfo) -> bool:
    return node.status in LIVE_STATUSES and node.active_replicas > 0


def _nodes_for_pending(nodes: Sequence[NodeInfo], pending_replicas: int, starting_nodes: int,
                       bounds: NodeBounds, now_s: float, replicas_per_node: int) -> int:
    """Return how many more nodes the pending replicas need, after those on their way."""
    if pending_replicas <= 0:
        return 0
    just_joined = sum(1 for node in nodes
                      if node.status == READY and node.active_replicas == 0
                      and now_s - node.idle_since_s < bounds.placement_grace_s)
    needed = math.ceil(pending_replicas / max(replicas_per_node, 1))
    return max(needed - starting_nodes - just_joined, 0)


def _idle_to_release(nodes: Sequence[NodeInfo], fleet: int, bounds: NodeBounds,
                     now_s: float) -> tuple[str, ...]:
    """Return managed nodes idle long enough, costliest (then longest idle) first."""
    idle = [node for node in nodes
            if node.managed and node.status == READY and node.active_replicas == 0
            and now_s - node.idle_since_s >= bounds.idle_release_s]
    idle.sort(key=lambda node: (-node.cost_per_hour, node.idle_since_s, node.name))
    return tuple(node.name for node in idle[:max(fleet - bounds.min_nodes, 0)])


def _add_reason(pending_replicas: int, starting_nodes: int, fleet: int, add: int, unmet: int,
                bounds: NodeBounds) -> str:
    why = (f"{pending_replicas} pending replicas" if pending_replicas
           else f"below min_nodes {bounds.min_nodes}")
    text = f"{why}, {starting_nodes} nodes starting: add {add} (fleet {fleet} → {fleet + add}"
    text += f", max {bounds.max_nodes})" if bounds.max_nodes < UNBOUNDED else ")"
    if unmet:
        text += f"; {unmet} more nodes wanted beyond max_nodes"
    return text
