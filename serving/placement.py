"""Where a new replica goes, and which replica goes first on scale-down (pure: no Django).

Candidates are ready nodes; a replica fits on a GPU with enough free memory, or on
the CPU of a node that has no GPU (when the deployment accepts the CPU). Among
those that fit: fewest replicas of this deployment first (spread), then nodes that
already hold the artifact in their cache, then the cheapest, then the most free
memory, then the lowest id (deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class DeviceRoom:
    """One device of a node and the memory still free on it, after planned replicas."""

    index: int
    kind: str  # "gpu" or "cpu"
    free_memory_bytes: int
    total_memory_bytes: int = 0  # 0: unknown (taken as the free memory)


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


def _candidates(node: NodeView, need: ReplicaNeed) -> list[DeviceRoom]:
    """Return the devices of a node a replica may use: its GPUs if it has any (unless the
    deployment wants the CPU), else its CPU (unless the deployment wants a GPU)."""
    gpus = [d for d in node.devices if d.kind == "gpu"]
    if need.device != "cpu" and gpus:
        return gpus
    if need.device == "gpu":
        return []
    return [d for d in node.devices if d.kind == "cpu"]


def _fitting_device(node: NodeView, need: ReplicaNeed) -> DeviceRoom | None:
    roomy = [d for d in _candidates(node, need) if d.free_memory_bytes >= need.memory_bytes]
    if roomy and roomy[0].kind == "cpu":
        return roomy[0]
    return max(roomy, key=lambda d: (d.free_memory_bytes, -d.index), default=None)


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
    return place_replicas_explained(nodes, need, count)[0]


def place_replicas_explained(nodes: list[NodeView], need: ReplicaNeed,
                             count: int) -> tuple[list[Placement], str]:
    """Place up to `count` replicas; return the placements and why the rest fit nowhere
    ("" when all were placed), judged on the room left after those placed."""
    views = {node.node_id: node for node in nodes}
    placements: list[Placement] = []
    for _ in range(count):
        placement = place_replica(list(views.values()), need)
        if placement is None:
            return placements, unplaced_reason(list(views.values()), need)
        placements.append(placement)
        views[placement.node_id] = _after(views[placement.node_id], placement, need)
    return placements, ""


def _after(node: NodeView, placement: Placement, need: ReplicaNeed) -> NodeView:
    target_kind = "cpu" if placement.gpu_index is None else "gpu"
    target_index = 0 if placement.gpu_index is None else placement.gpu_index
    devices = tuple(
        replace(d, free_memory_bytes=d.free_memory_bytes - need.memory_bytes)
        if d.kind == target_kind and (d.kind == "cpu" or d.index == target_index) else d
        for d in node.devices
    )
    return NodeView(node.node_id, node.cost_per_hour, devices,
                    node.replicas_of_deployment + 1, node.cached_artifacts)


def unplaced_reason(nodes: list[NodeView], need: ReplicaNeed) -> str:
    """Return why `place_replica` finds no room, in an operator's words.

    E.g. "no ready node in the pool", "no GPU in the pool", "no node has 900 GiB
    free (the roomiest device has 14 GiB free of 16 GiB)", or, when even an empty
    device is too small, "no node has 900 GiB of memory on one device: ...".
    """
    if not nodes:
        return "no ready node in the pool"
    devices = [d for node in nodes for d in _candidates(node, need)]
    if not devices:
        return "no GPU in the pool" if need.device == "gpu" else "no CPU device in the pool"
    wanted = format_bytes(need.memory_bytes)
    largest = max(d.total_memory_bytes or d.free_memory_bytes for d in devices)
    roomiest = max(d.free_memory_bytes for d in devices)
    if largest < need.memory_bytes:
        return (f"no node has {wanted} of memory on one device: the largest has "
                f"{format_bytes(largest)}")
    return (f"no node has {wanted} free (the roomiest device has {format_bytes(roomiest)} "
            f"free): waiting for replicas to leave or nodes to join")


def format_bytes(count: int) -> str:
    """Return a byte count for people: "512 MiB", "900 GiB", "1.5 TiB"."""
    size, unit = float(max(count, 0)), "bytes"
    for next_unit in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, next_unit
    return f"{size:.0f} {unit}" if size >= 10 or unit == "bytes" else f"{size:.1f} {unit}"


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
