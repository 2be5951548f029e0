"""Placement (pure): memory fit, spread, cache preference, cost order, removal order."""

from __future__ import annotations

import subprocess
import sys

from serving.placement import (
    DeviceRoom,
    NodeView,
    Placement,
    ReplicaNeed,
    ReplicaView,
    place_replica,
    place_replicas,
    removal_order,
)

GIB = 1024**3


def gpu_node(node_id: int, *free_gib: float, cost: float = 1.0, replicas: int = 0,
             cached: tuple[str, ...] = ()) -> NodeView:
    devices = tuple(DeviceRoom(i, "gpu", int(f * GIB)) for i, f in enumerate(free_gib))
    return NodeView(node_id, cost, devices, replicas, frozenset(cached))


def cpu_node(node_id: int, free_gib: float = 16, cost: float = 0.0) -> NodeView:
    return NodeView(node_id, cost, (DeviceRoom(0, "cpu", int(free_gib * GIB)),))


NEED = ReplicaNeed(memory_bytes=2 * GIB, device="auto", sha256="abc")


def test_a_replica_goes_to_a_gpu_with_enough_free_memory():
    nodes = [gpu_node(1, 1.0), gpu_node(2, 0.5, 3.0)]
    assert place_replica(nodes, NEED) == Placement(2, 1)


def test_nothing_fits_gives_none():
    assert place_replica([gpu_node(1, 1.0)], NEED) is None
    assert place_replica([cpu_node(1)], ReplicaNeed(GIB, "gpu")) is None


def test_a_node_without_gpu_takes_the_replica_on_its_cpu():
    assert place_replica([cpu_node(7)], NEED) == Placement(7, None)


def test_a_gpu_only_deployment_never_lands_on_a_cpu():
    nodes = [cpu_node(1), gpu_node(2, 4.0, cost=9.0)]
    assert place_replica(nodes, ReplicaNeed(GIB, "gpu")) == Placement(2, 0)


def test_replicas_of_one_deployment_spread_over_nodes():
    nodes = [gpu_node(1, 80.0, replicas=1), gpu_node(2, 8.0)]
    assert place_replica(nodes, NEED).node_id == 2
    placed = place_replicas([gpu_node(1, 80.0), gpu_node(2, 8.0)], NEED, 4)
    assert sorted(p.node_id for p in placed) == [1, 1, 2, 2]


def test_nodes_holding_the_artifact_come_first_then_the_cheapest():
    nodes = [gpu_node(1, 8.0, cost=0.5), gpu_node(2, 8.0, cost=2.0, cached=("abc",)),
             gpu_node(3, 8.0, cost=0.2)]
    assert place_replica(nodes, NEED).node_id == 2
    assert place_replica(nodes, ReplicaNeed(GIB, "auto", "other")).node_id == 3


def test_placing_many_uses_up_memory():
    placed = place_replicas([gpu_node(1, 5.0)], NEED, 3)
    assert placed == [Placement(1, 0), Placement(1, 0)]


def test_removal_takes_not_ready_then_costliest_then_idlest():
    replicas = [ReplicaView(1, 1.0, 5, True), ReplicaView(2, 3.0, 9, True),
                ReplicaView(3, 1.0, 0, True), ReplicaView(4, 0.1, 0, False)]
    assert removal_order(replicas) == [4, 2, 3, 1]


def test_placement_imports_no_django():
    code = "import sys, serving.placement; print('django' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"
