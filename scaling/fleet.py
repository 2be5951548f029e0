"""A modelled fleet of GPU nodes for the simulator (pure: no Django).

`Fleet` describes the nodes; `FleetModel` tracks replicas on them as a simulation
runs, placing and removing through `serving.placement` so the simulator exercises
the same rules as the portal. Placement cost stays cheap on big fleets: nodes that
look alike to the placement ranking (same type, replica count, cache and free
memory) form a class, and only each class's lowest node id is offered, which gives
exactly the answer the full list would (the ranking ends with the lowest id).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from serving.placement import (
    DeviceRoom,
    NodeView,
    ReplicaNeed,
    ReplicaView,
    place_replica,
    removal_order,
)

GIB = 1024**3


@dataclass(frozen=True)
class NodeType:
    """A kind of GPU server: its GPUs, price, and how fast one replica on it serves."""

    name: str
    gpu_name: str
    gpu_memory_bytes: int
    price_per_hour: float
    service_rate_per_s: float  # requests per second one replica sustains here
    gpus_per_node: int = 1


@dataclass(frozen=True)
class Fleet:
    """The modelled nodes and the replica they host."""

    groups: tuple[tuple[NodeType, int], ...]  # (node type, how many nodes of it)
    replica_memory_bytes: int
    cold_start_s: float = 30.0  # from placement until a replica serves
    base_latency_s: float = 0.2  # service time of one request with no queue
    artifact_sha256: str = "model"

    @property
    def node_count(self) -> int:
        """Return how many nodes the fleet has."""
        return sum(count for _, count in self.groups)

    @property
    def replica_slots(self) -> int:
        """Return how many replicas fit on the whole fleet."""
        return sum(count * node_type.gpus_per_node
                   * (node_type.gpu_memory_bytes // self.replica_memory_bytes)
                   for node_type, count in self.groups)

    @property
    def slowest_rate_per_s(self) -> float:
        """Return the lowest per-replica service rate among the node types."""
        return min(node_type.service_rate_per_s for node_type, _ in self.groups)


L4 = NodeType("l4x1", "NVIDIA L4", 24 * GIB, 0.85, 20.0)
A10G = NodeType("a10gx1", "NVIDIA A10G", 24 * GIB, 1.21, 25.0)
A10G_X4 = NodeType("a10gx4", "NVIDIA A10G", 24 * GIB, 5.67, 25.0, gpus_per_node=4)


def default_fleet(nodes: int) -> Fleet:
    """Return a mixed fleet of `nodes` nodes, one 20 GiB replica per 24 GiB GPU."""
    if nodes < 1:
        raise ValueError(f"nodes: must be >= 1, got {nodes}")
    quad, single_a10g = nodes * 35 // 100, nodes * 15 // 100
    groups = ((L4, nodes - quad - single_a10g), (A10G, single_a10g), (A10G_X4, quad))
    return Fleet(tuple((t, n) for t, n in groups if n > 0), replica_memory_bytes=20 * GIB)


@dataclass
class _Replica:
    node_id: int
    gpu_index: int
    rate_per_s: float
    ready: bool


_ClassKey = tuple[int, int, bool, tuple[int, ...]]  # type, replicas, cached, free bytes


class FleetModel:
    """Replicas on a modelled fleet, with running totals the simulator reads each tick."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._need = ReplicaNeed(fleet.replica_memory_bytes, "gpu", fleet.artifact_sha256)
        self._types = [t for t, _ in fleet.groups]
        self._type_of = [i for i, (_, count) in enumerate(fleet.groups) for _ in range(count)]
        self._free = [[self._types[i].gpu_memory_bytes] * self._types[i].gpus_per_node
                      for i in self._type_of]
        self._count = [0] * len(self._type_of)
        self._cached = [False] * len(self._type_of)
        self._replicas: dict[int, _Replica] = {}
        self._next_replica_id = 1
        self._pending: deque[tuple[float, int]] = deque()  # (ready_at_s, replica id)
        self._key_of: list[_ClassKey] = []
        self._classes: dict[_ClassKey, list[int]] = {}  # heaps of node ids, lazily cleaned
        for node_id in range(len(self._type_of)):
            self._key_of.append(self._key(node_id))
            self._classes.setdefault(self._key_of[node_id], []).append(node_id)
        self.ready_rate_per_s = 0.0  # what the ready replicas serve together
        self.active_price_per_hour = 0.0  # nodes with at least one replica
        self.active_nodes = 0
        self.peak_active_nodes = 0

    @property
    def replica_count(self) -> int:
        """Return replicas that count for scaling: ready and starting."""
        return len(self._replicas)

    @property
    def ready_count(self) -> int:
        """Return replicas that serve now."""
        return len(self._replicas) - len(self._pending)

    def node_views(self) -> list[NodeView]:
        """Return every node as placement sees it (for checks; the simulator offers fewer)."""
        return [self._view(node_id) for node_id in range(len(self._type_of))]

    def replica_locations(self) -> list[tuple[int, int]]:
        """Return (node id, GPU index) of every replica, oldest first."""
        return [(r.node_id, r.gpu_index) for r in self._replicas.values()]

    def add(self, count: int, now_s: float) -> int:
        """Place up to `count` replicas, ready after the cold start; return how many fit."""
        for placed in range(count):
            nodes = [self._view(node_id) for node_id in self._representatives()]
            placement = place_replica(nodes, self._need)
            if placement is None or placement.gpu_index is None:
                return placed
            self._start(placement.node_id, placement.gpu_index, now_s)
        return count

    def remove(self, count: int, in_flight_per_replica: float) -> int:
        """Remove `count` replicas in `removal_order`; return how many went."""
        views = [ReplicaView(rid, self._types[self._type_of[r.node_id]].price_per_hour,
                             round(in_flight_per_replica) if r.ready else 0, r.ready)
                 for rid, r in self._replicas.items()]
        doomed = removal_order(views)[:count]
        for replica_id in doomed:
            self._stop(replica_id)
        return len(doomed)

    def promote_ready(self, now_s: float) -> None:
        """Mark replicas whose cold start has passed as ready."""
        while self._pending and self._pending[0][0] <= now_s:
            _, replica_id = self._pending.popleft()
            replica = self._replicas[replica_id]
            replica.ready = True
            self.ready_rate_per_s += replica.rate_per_s

    def _key(self, node_id: int) -> _ClassKey:
        return (self._type_of[node_id], self._count[node_id], self._cached[node_id],
                tuple(self._free[node_id]))

    def _representatives(self) -> list[int]:
        """Return the lowest node id of every non-empty class."""
        chosen = []
        for key, heap in list(self._classes.items()):
            while heap and self._key_of[heap[0]] != key:
                heapq.heappop(heap)  # the node moved to another class since
            if heap:
                chosen.append(heap[0])
            else:
                del self._classes[key]
        return chosen

    def _view(self, node_id: int) -> NodeView:
        node_type = self._types[self._type_of[node_id]]
        devices = tuple(DeviceRoom(i, "gpu", free) for i, free in enumerate(self._free[node_id]))
        cached = frozenset({self.fleet.artifact_sha256}) if self._cached[node_id] else frozenset()
        return NodeView(node_id, node_type.price_per_hour, devices, self._count[node_id], cached)

    def _reclassify(self, node_id: int) -> None:
        key = self._key(node_id)
        self._key_of[node_id] = key
        heapq.heappush(self._classes.setdefault(key, []), node_id)

    def _start(self, node_id: int, gpu_index: int, now_s: float) -> None:
        node_type = self._types[self._type_of[node_id]]
        self._free[node_id][gpu_index] -= self.fleet.replica_memory_bytes
        self._count[node_id] += 1
        self._cached[node_id] = True  # the artifact stays in the node's cache afterwards
        if self._count[node_id] == 1:
            self.active_price_per_hour += node_type.price_per_hour
            self.active_nodes += 1
            self.peak_active_nodes = max(self.peak_active_nodes, self.active_nodes)
        self._reclassify(node_id)
        replica_id = self._next_replica_id
        self._next_replica_id += 1
        self._replicas[replica_id] = _Replica(node_id, gpu_index, node_type.service_rate_per_s,
                                              ready=False)
        self._pending.append((now_s + self.fleet.cold_start_s, replica_id))

    def _stop(self, replica_id: int) -> None:
        replica = self._replicas.pop(replica_id)
        if replica.ready:
            # Reset at zero so float drift never leaves a ghost of capacity behind.
            self.ready_rate_per_s = (self.ready_rate_per_s - replica.rate_per_s
                                     if self.ready_count else 0.0)
        else:
            self._pending.remove(next(p for p in self._pending if p[1] == replica_id))
        node_id = replica.node_id
        self._free[node_id][replica.gpu_index] += self.fleet.replica_memory_bytes
        self._count[node_id] -= 1
        if self._count[node_id] == 0:
            node_type = self._types[self._type_of[node_id]]
            self.active_nodes -= 1
            self.active_price_per_hour = (self.active_price_per_hour - node_type.price_per_hour
                                          if self.active_nodes else 0.0)
        self._reclassify(node_id)
