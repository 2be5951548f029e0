"""Prefix affinity (pure): rendezvous order, bounded load, and the balancer's use of it."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from serving.affinity import affinity_choice, prefix_key, rendezvous_order
from serving.balancing import Balancer, BalancerConfig, Lease, RoutableReplica, Unavailable

REPLICAS = [11, 12, 13, 14]


def keys(count: int) -> list[bytes]:
    return [prefix_key(f"system prompt {n}: you are a helpful model") for n in range(count)]


def balancer(*replicas: RoutableReplica, slack: int = 2) -> Balancer:
    built = Balancer(random.Random(0), BalancerConfig(affinity_slack=slack))
    built.update_replicas(replicas)
    return built


def replica(replica_id: int, **fields: object) -> RoutableReplica:
    return RoutableReplica(replica_id, f"10.0.0.{replica_id}:9000", **fields)  # type: ignore[arg-type]


def test_prefix_key_keeps_only_the_first_characters():
    assert prefix_key("abcdef", 3) == b"abc"
    assert prefix_key("short", 256) == b"short"
    assert prefix_key("é" * 10, 2) == "éé".encode()
    # Prompts that differ only after the prefix share a key.
    assert prefix_key("x" * 300 + "tail one") == prefix_key("x" * 300 + "tail two")


def test_the_same_prefix_always_ranks_the_replicas_alike():
    for key in keys(50):
        assert rendezvous_order(key, REPLICAS) == rendezvous_order(key, list(reversed(REPLICAS)))


def test_prefixes_spread_evenly_over_idle_replicas():
    firsts = Counter(rendezvous_order(key, REPLICAS)[0] for key in keys(2000))
    assert set(firsts) == set(REPLICAS)
    assert all(400 <= count <= 600 for count in firsts.values()), firsts


def test_removing_a_replica_moves_only_the_prefixes_it_won():
    before = {key: rendezvous_order(key, REPLICAS)[0] for key in keys(1000)}
    after = {key: rendezvous_order(key, [11, 12, 14])[0] for key in keys(1000)}
    moved = [key for key in before if before[key] != after[key]]
    assert moved and all(before[key] == 13 for key in moved)


def test_an_idle_choice_follows_the_rendezvous_order():
    idle = dict.fromkeys(REPLICAS, 0)
    for key in keys(20):
        assert affinity_choice(key, idle) == rendezvous_order(key, REPLICAS)[0]


def test_a_busy_first_choice_spills_to_the_next_within_the_slack():
    key = keys(1)[0]
    first, second, *_ = rendezvous_order(key, REPLICAS)
    load = dict.fromkeys(REPLICAS, 1)
    load[first] = 3  # within slack 2 of the least loaded (1): still the first choice
    assert affinity_choice(key, load, slack=2) == first
    load[first] = 4  # beyond it: the next replica in this prefix's order
    assert affinity_choice(key, load, slack=2) == second
    assert affinity_choice(key, {}, slack=2) is None


def test_the_balancer_keeps_a_prefix_on_one_replica():
    built = balancer(*(replica(rid) for rid in REPLICAS))
    key = keys(1)[0]
    chosen = set()
    for _ in range(10):
        lease = built.choose(0.0, affinity=key)
        assert isinstance(lease, Lease)
        chosen.add(lease.replica_id)
        lease.release("success", 0.01, 0.01)
    assert chosen == {rendezvous_order(key, REPLICAS)[0]}


def test_the_balancer_spills_a_hot_prefix_and_honours_exclusions():
    built = balancer(*(replica(rid) for rid in REPLICAS), slack=1)
    key = keys(1)[0]
    order = rendezvous_order(key, REPLICAS)
    held = [built.choose(0.0, affinity=key) for _ in range(3)]
    # 1 on the first choice, then 2 > 0 + slack: the second takes one, then the first again
    assert [lease.replica_id for lease in held if isinstance(lease, Lease)] == \
        [order[0], order[0], order[1]]
    retry = built.choose(0.0, exclude=frozenset({order[0]}), affinity=key)
    assert isinstance(retry, Lease) and retry.replica_id == order[1]


def test_affinity_skips_draining_replicas_and_other_versions():
    key = keys(1)[0]
    order = rendezvous_order(key, REPLICAS)
    built = balancer(*(replica(rid, draining=rid == order[0],
                               version=2 if rid == order[1] else 1) for rid in REPLICAS))
    lease = built.choose(0.0, version=1, affinity=key)
    assert isinstance(lease, Lease) and lease.replica_id == order[2]
    assert built.choose(0.0, version=3, affinity=key) is Unavailable.NO_REPLICA


def test_a_negative_slack_is_refused():
    with pytest.raises(ValueError, match="affinity_slack"):
        BalancerConfig(affinity_slack=-1)
