"""Where a new replica goes, and which replica goes first on scale-down (pure: no Django).

Candidates are ready nodes; a replica fits on a GPU with enough free memory, or on
the CPU of a node that has no GPU (when the deployment accepts the CPU). Among
those that fit: fewest replicas of this deployment first (spread), then nodes that
already hold the artifact in their cache, then the cheapest, then the most free
memory, then the lowest id (deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DeviceRoom:
    """One device of a node and the memory still free on it, after planned replicas."""

    index: int
    kind: str  # "gpu" or "cpu"
    free_memory_bytes: int


@dataclass(frozen=True)
class NodeView:
    node_id: int
    cost_per_hour: float
    devices: tuple[DeviceRoom, ...]
    replicas_of_deployment: int = 0
    cached_artifacts: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class ReplicaNeed:
    memory_bytes: int
    device: str  # "auto", "gpu" or "cpu"
    sha256: str = ""


@dataclass(frozen=True)
class Placement:
    node_id: int
    gpu_index: int | None  # None: the CPU


def _fitting_device(node: NodeView, need: ReplicaNeed) -> DeviceRoom | None:
    gpus = [d for d in node.devices if d.kind == "gpu"]
    if need.device != "cpu" and gpus:
        roomy = [d for d in gpus if d.free_memory_bytes >= need.memory_bytes]
        return max(roomy, key=lambda d: (d.free_memory_bytes, -d.index), default=None)
    if need.device == "gpu":
        return None
    cpus = [d for d in node.devices if d.kind == "cpu"]
    roomy = [d for d in cpus if d.free_memory_bytes >= need.memory_bytes]
    return roomy[0] if roomy else None


def place_replica(nodes: list[NodeView], need: ReplicaNeed) -> Placement | None:
    """Return the best node and device for one more replica, or None when none fits."""
    options = []
    for node in nodes:
        device = _fitting_device(node, need)
        if device is None:
            continue
        rank = (node.replicas_of_deployment, need.sha256 not in node.cached_artifacts,
                node.cost_per_hour, -device.free_memory_bytes, node.node_id)
        options.append((rank, node, device))
    if not options:
        return None
    _, node, device = min(options, key=lambda option: option[0])
    return Placement(node.node_id, device.index if device.kind == "gpu" else None)


def place_replicas(nodes: list[NodeView], need: ReplicaNeed, count: int) -> list[Placement]:
    """Place `count` replicas one by one, updating room and spread after each."""
    views = {node.node_id: node for node in nodes}
    placements: list[Placement] = []
    for _ in range(count):
        placement = place_replica(list(views.values()), need)
        if placement is None:
            break
        placements.append(placement)
        views[placement.node_id] = _after(views[placement.node_id], placement, need)
    return placements


def _after(node: NodeView, placement: Placement, need: ReplicaNeed) -> NodeView:
    target_kind = "cpu" if placement.gpu_index is None else "gpu"
    target_index = 0 if placement.gpu_index is None else placement.gpu_index
    devices = tuple(
        DeviceRoom(d.index, d.kind, d.free_memory_bytes - need.memory_bytes)
        if d.kind == target_kind and (d.kind == "cpu" or d.index == target_index) else d
        for d in node.devices
    )
    return NodeView(node.node_id, node.cost_per_hour, devices,
                    node.replicas_of_deployment + 1, node.cached_artifacts)


@dataclass(frozen=True)
class ReplicaView:
    replica_id: int
    node_cost_per_hour: float
    in_flight: int
    ready: bool


def removal_order(replicas: list[ReplicaView]) -> list[int]:
    """Return replica ids in the order to remove them: not ready, costliest, idlest, newest."""
    ranked = sorted(replicas, key=lambda r: (r.ready, -r.node_cost_per_hour, r.in_flight,
                                             -r.replica_id))
    return [r.replica_id for r in ranked]
