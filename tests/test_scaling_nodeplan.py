"""Node plan (pure): add for pending replicas, bounds, release idle nodes, live cost."""

from __future__ import annotations

import pytest

from scaling.nodeplan import (
    DRAINING,
    OFFLINE,
    READY,
    NodeBounds,
    NodeInfo,
    active_cost_per_hour,
    plan_nodes,
    replicas_per_new_node,
)

NOW_S = 10_000.0
BOUNDS = NodeBounds(min_nodes=1, max_nodes=3, idle_release_s=60.0)


def node(name: str, *, replicas: int = 1, cost: float = 1.0, idle_for_s: float = 0.0,
         managed: bool = True, status: str = READY, node_id: int = 0) -> NodeInfo:
    return NodeInfo(id=node_id or int(name.rsplit("-", 1)[-1]), name=name, managed=managed,
                    status=status, active_replicas=replicas, cost_per_hour=cost,
                    idle_since_s=NOW_S - idle_for_s)


def test_pending_replicas_add_a_node_each():
    plan = plan_nodes([node("local-1")], pending_replicas=2, starting_nodes=0, bounds=BOUNDS,
                      now_s=NOW_S)
    assert plan.add == 2
    assert plan.release == ()
    assert "2 pending replicas" in plan.reason


def test_nodes_already_starting_count_towards_the_pending_replicas():
    plan = plan_nodes([node("local-1")], pending_replicas=2, starting_nodes=1, bounds=BOUNDS,
                      now_s=NOW_S)
    assert plan.add == 1
    waiting = plan_nodes([node("local-1")], pending_replicas=1, starting_nodes=1,
                         bounds=BOUNDS, now_s=NOW_S)
    assert (waiting.add, waiting.release) == (0, ())
    assert "waiting" in waiting.reason


def test_a_node_that_just_joined_empty_is_capacity_on_its_way():
    fresh = node("local-2", replicas=0, idle_for_s=3.0)
    plan = plan_nodes([node("local-1"), fresh], pending_replicas=1, starting_nodes=0,
                      bounds=BOUNDS, now_s=NOW_S)
    assert plan.add == 0
    stale = node("local-2", replicas=0, idle_for_s=30.0)  # had its turn: the replica fits not
    assert plan_nodes([node("local-1"), stale], pending_replicas=1, starting_nodes=0,
                      bounds=BOUNDS, now_s=NOW_S).add == 1


def test_adding_stops_at_max_nodes_and_the_rest_is_unmet():
    plan = plan_nodes([node("local-1"), node("local-2")], pending_replicas=5, starting_nodes=0,
                      bounds=BOUNDS, now_s=NOW_S)
    assert plan.add == 1
    assert plan.unmet_nodes == 4
    assert "max" in plan.reason
    full = plan_nodes([node("local-1"), node("local-2"), node("local-3")], pending_replicas=1,
                      starting_nodes=0, bounds=BOUNDS, now_s=NOW_S)
    assert (full.add, full.unmet_nodes) == (0, 1)


def test_replicas_per_node_packs_pending_replicas():
    bounds = NodeBounds(min_nodes=0, max_nodes=10, idle_release_s=60.0)
    plan = plan_nodes([], pending_replicas=5, starting_nodes=0, bounds=bounds, now_s=NOW_S,
                      replicas_per_node=4)
    assert plan.add == 2


def test_a_new_node_is_judged_by_the_largest_known_node():
    gib = 1024**3
    # One node with two 24 GiB GPUs, one with a single 80 GiB GPU: 20 GiB replicas.
    assert replicas_per_new_node([[24 * gib, 24 * gib], [80 * gib]], 20 * gib, 9) == 4
    assert replicas_per_new_node([[8 * gib]], 20 * gib, 9) == 1  # never less than one
    # Nothing known yet: one new node for the whole first burst, the next tick knows more.
    assert replicas_per_new_node([], 20 * gib, 3) == 3


def test_a_fleet_below_min_nodes_is_topped_up():
    bounds = NodeBounds(min_nodes=2, max_nodes=3, idle_release_s=60.0)
    plan = plan_nodes([], pending_replicas=0, starting_nodes=0, bounds=bounds, now_s=NOW_S)
    assert plan.add == 2
    assert "min_nodes" in plan.reason
    starting = plan_nodes([], pending_replicas=0, starting_nodes=2, bounds=bounds, now_s=NOW_S)
    assert starting.add == 0


def test_idle_managed_nodes_are_released_costliest_first_beyond_min_nodes():
    nodes = [node("local-1", replicas=0, cost=1.0, idle_for_s=600),
             node("local-2", replicas=0, cost=3.0, idle_for_s=90),
             node("local-3", replicas=0, cost=2.0, idle_for_s=90)]
    plan = plan_nodes(nodes, pending_replicas=0, starting_nodes=0, bounds=BOUNDS, now_s=NOW_S)
    assert plan.release == ("local-2", "local-3")  # min_nodes 1 keeps the cheapest
    assert plan.add == 0
    assert "release" in plan.reason


def test_equal_cost_releases_the_longest_idle_first():
    nodes = [node("local-1"), node("local-2", replicas=0, idle_for_s=70),
             node("local-3", replicas=0, idle_for_s=500)]
    plan = plan_nodes(nodes, pending_replicas=0, starting_nodes=0,
                      bounds=NodeBounds(min_nodes=2, max_nodes=3, idle_release_s=60.0),
                      now_s=NOW_S)
    assert plan.release == ("local-3",)


def test_a_node_with_replicas_is_never_released():
    nodes = [node("local-1", replicas=1, cost=9.0, idle_for_s=10_000),
             node("local-2", replicas=2, cost=5.0, idle_for_s=10_000)]
    plan = plan_nodes(nodes, pending_replicas=0, starting_nodes=0,
                      bounds=NodeBounds(min_nodes=0, max_nodes=3, idle_release_s=0.0),
                      now_s=NOW_S)
    assert plan.release == ()
    assert "steady" in plan.reason


def test_nodes_idle_for_less_than_idle_release_s_stay():
    nodes = [node("local-1"), node("local-2", replicas=0, idle_for_s=59.0)]
    plan = plan_nodes(nodes, pending_replicas=0, starting_nodes=0, bounds=BOUNDS, now_s=NOW_S)
    assert plan.release == ()


def test_nodes_joined_by_hand_or_draining_are_not_released():
    nodes = [node("gpu-1", replicas=0, idle_for_s=999, managed=False),
             node("local-2", replicas=0, idle_for_s=999, status=DRAINING),
             node("local-3")]
    plan = plan_nodes(nodes, pending_replicas=0, starting_nodes=0,
                      bounds=NodeBounds(min_nodes=0, max_nodes=3, idle_release_s=60.0),
                      now_s=NOW_S)
    assert plan.release == ()


def test_nothing_is_released_while_replicas_wait_for_room():
    nodes = [node("local-1"), node("local-2", replicas=0, idle_for_s=999)]
    plan = plan_nodes(nodes, pending_replicas=1, starting_nodes=0,
                      bounds=NodeBounds(min_nodes=0, max_nodes=2, idle_release_s=60.0),
                      now_s=NOW_S)
    assert plan.release == ()


def test_live_cost_counts_only_live_nodes_that_hold_replicas():
    nodes = [node("local-1", replicas=2, cost=1.5), node("local-2", replicas=0, cost=4.0),
             node("local-3", replicas=1, cost=2.0, status=DRAINING),
             node("local-4", replicas=1, cost=8.0, status=OFFLINE)]
    assert active_cost_per_hour(nodes) == pytest.approx(3.5)
    assert active_cost_per_hour([]) == 0.0


def test_bounds_refuse_min_above_max():
    with pytest.raises(ValueError, match="min_nodes"):
        NodeBounds(min_nodes=3, max_nodes=2, idle_release_s=60.0)
