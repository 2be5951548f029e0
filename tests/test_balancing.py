"""Load balancing (pure): policies, eligibility, ejection, exact in-flight accounting, splits."""

from __future__ import annotations

import heapq
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Sequence

import pytest

from serving.balancing import (
    Balancer,
    BalancerConfig,
    Lease,
    Outcome,
    Policy,
    ReplicaState,
    RoutableReplica,
    Unavailable,
)
from serving.traffic import pick_version, restrict_to_version, version_for_request

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # not a declared dev dependency: the seeded loop below still runs
    given = None


def replica(replica_id: int, **fields: object) -> RoutableReplica:
    return RoutableReplica(replica_id, f"10.0.0.{replica_id}:9000", **fields)  # type: ignore[arg-type]


def balancer(*replicas: RoutableReplica, seed: int = 0, **config: object) -> Balancer:
    built = Balancer(random.Random(seed), BalancerConfig(**config))  # type: ignore[arg-type]
    built.update_replicas(replicas)
    return built


def lease(result: Lease | Unavailable) -> Lease:
    assert isinstance(result, Lease), result
    return result


def outstanding(b: Balancer) -> dict[int, int]:
    return {s.replica.replica_id: s.outstanding for s in b.replicas}


def state_of(b: Balancer, replica_id: int) -> ReplicaState:
    return next(s for s in b.replicas if s.replica.replica_id == replica_id)


def fail(b: Balancer, replica_id: int, now_s: float, times: int = 1) -> None:
    for _ in range(times):
        lease(b.choose(now_s, exclude=others(b, replica_id))).release(Outcome.FAILURE, 0.01, now_s)


def others(b: Balancer, replica_id: int) -> frozenset[int]:
    return frozenset(s.replica.replica_id for s in b.replicas) - {replica_id}


def ids(leases: Iterable[Lease]) -> Counter[int]:
    return Counter(one.replica_id for one in leases)


# Policies


def test_p2c_prefers_the_replica_with_fewer_outstanding_requests():
    for seed in range(20):
        b = balancer(replica(1), replica(2), seed=seed)
        for _ in range(3):
            lease(b.choose(0.0, exclude=frozenset({2})))  # held: three in flight on replica 1
        assert lease(b.choose(0.0)).replica_id == 2


def test_p2c_prefers_the_faster_replica_when_both_are_idle():
    b = balancer(replica(1), replica(2))
    lease(b.choose(0.0, exclude=frozenset({2}))).release(Outcome.SUCCESS, 0.5, 1.0)
    lease(b.choose(0.0, exclude=frozenset({1}))).release(Outcome.SUCCESS, 0.01, 1.0)
    # Until replica 2 holds 50 requests, (outstanding + 1) * 0.01 s stays below 0.5 s (at
    # the time of the samples: later, both estimates drift toward the deployment's).
    assert {lease(b.choose(1.0)).replica_id for _ in range(49)} == {2}


def test_p2c_keeps_in_flight_even_when_requests_pile_up():
    b = balancer(*(replica(i) for i in range(1, 6)), seed=7)
    for _ in range(500):
        lease(b.choose(0.0))
    counts = outstanding(b).values()
    assert sum(counts) == 500
    assert max(counts) - min(counts) <= 3


def simulate(b: Balancer, service_s: dict[int, float], requests: int,
             interval_s: float) -> Counter[int]:
    """Send requests at a fixed rate; each finishes after its replica's service time."""
    finishing: list[tuple[float, int, Lease]] = []
    served: Counter[int] = Counter()
    for n in range(requests):
        now_s = n * interval_s
        while finishing and finishing[0][0] <= now_s:
            done_s, _, done = heapq.heappop(finishing)
            done.release(Outcome.SUCCESS, done_s - done.started_s, done_s)
        chosen = lease(b.choose(now_s))
        served[chosen.replica_id] += 1
        heapq.heappush(finishing, (now_s + service_s[chosen.replica_id], n, chosen))
    return served


def test_p2c_spreads_load_evenly_when_latencies_are_equal():
    b = balancer(replica(1), replica(2), replica(3), seed=3)
    served = simulate(b, {1: 0.05, 2: 0.05, 3: 0.05}, requests=6000, interval_s=0.005)
    assert all(1700 < served[i] < 2300 for i in (1, 2, 3)), served


def test_p2c_shifts_load_away_from_a_slow_replica():
    b = balancer(replica(1), replica(2), replica(3), seed=3, ewma_half_life_s=1.0)
    served = simulate(b, {1: 0.05, 2: 0.05, 3: 0.5}, requests=6000, interval_s=0.005)
    assert served[3] < 0.1 * 6000, served
    assert abs(served[1] - served[2]) < 0.1 * 6000, served


def sequential(b: Balancer, mean_s: dict[int, float], requests: int, seed: int,
               start_s: float = 0.0) -> tuple[Counter[int], float]:
    """Send requests one after another (nothing outstanding), each taking its replica's mean
    latency give or take 15 %; return who served them and when the last one ended."""
    jitter = random.Random(seed)
    served: Counter[int] = Counter()
    now_s = start_s
    for _ in range(requests):
        chosen = lease(b.choose(now_s))
        latency_s = mean_s[chosen.replica_id] * jitter.uniform(0.85, 1.15)
        now_s += latency_s
        chosen.release(Outcome.SUCCESS, latency_s, now_s)
        served[chosen.replica_id] += 1
        now_s += 0.001
    return served, now_s


@pytest.mark.parametrize("seed", range(20))
def test_p2c_spreads_sequential_requests_over_equally_fast_idle_replicas(seed):
    b = balancer(replica(1), replica(2), seed=seed)
    served, _ = sequential(b, {1: 0.01, 2: 0.01}, 200, seed)
    assert min(served[1], served[2]) >= 50, served


def test_a_replica_whose_only_sample_was_slow_is_explored_again():
    b = balancer(replica(1), replica(2), seed=1)
    lease(b.choose(0.0, exclude=frozenset({1}))).release(Outcome.SUCCESS, 0.03, 0.03)
    served, now_s = sequential(b, {1: 0.01, 2: 0.01}, 3000, seed=1, start_s=0.03)
    assert served[2] > 0, served  # its estimate drifted back toward the deployment's
    served, _ = sequential(b, {1: 0.01, 2: 0.01}, 1000, seed=2, start_s=now_s)
    assert min(served[1], served[2]) >= 250, served


def test_sequential_requests_still_favour_the_faster_replica_but_probe_the_slower():
    b = balancer(replica(1), replica(2), seed=4)
    served, _ = sequential(b, {1: 0.01, 2: 0.03}, 3000, seed=4)
    assert 0 < served[2] < 0.15 * 3000, served


def test_a_replica_without_samples_is_priced_like_an_average_replica():
    b = balancer(replica(1), seed=1)
    lease(b.choose(0.0)).release(Outcome.SUCCESS, 0.2, 1.0)
    b.update_replicas([replica(1), replica(2)])
    # Both idle: replica 2 (unsampled) costs the deployment's EWMA, equal to replica 1's.
    assert state_of(b, 2).ewma_latency_s is None
    picks = ids(lease(b.choose(2.0)) for _ in range(2))
    assert picks == Counter({1: 1, 2: 1})


def test_the_ewma_forgets_half_of_the_past_per_half_life():
    b = balancer(replica(1), ewma_half_life_s=2.0)
    lease(b.choose(0.0)).release(Outcome.SUCCESS, 1.0, 10.0)
    lease(b.choose(10.0)).release(Outcome.SUCCESS, 3.0, 12.0)
    assert state_of(b, 1).ewma_latency_s == pytest.approx(2.0)
    # No time passed: the sample still counts for the minimum weight (5 %), or else at high
    # rates an estimate would stay frozen at its first sample.
    lease(b.choose(12.0)).release(Outcome.SUCCESS, 0.0, 12.0)
    assert state_of(b, 1).ewma_latency_s == pytest.approx(1.9)


def test_least_outstanding_picks_the_idlest_replica():
    b = balancer(replica(1), replica(2), replica(3), policy="least_outstanding")
    lease(b.choose(0.0, exclude=frozenset({2, 3})))
    lease(b.choose(0.0, exclude=frozenset({1, 3})))
    assert lease(b.choose(0.0)).replica_id == 3


def test_least_outstanding_takes_turns_among_equally_idle_replicas():
    b = balancer(replica(1), replica(2), replica(3), policy=Policy.LEAST_OUTSTANDING)
    picks = []
    for _ in range(9):
        chosen = lease(b.choose(0.0))
        picks.append(chosen.replica_id)
        chosen.release(Outcome.SUCCESS, 0.01, 0.0)
    assert Counter(picks) == Counter({1: 3, 2: 3, 3: 3})


def test_round_robin_distribution_is_even():
    b = balancer(*(replica(i) for i in range(1, 5)), policy="round_robin")
    picks = []
    for _ in range(400):
        chosen = lease(b.choose(0.0))
        picks.append(chosen.replica_id)
        chosen.release(Outcome.SUCCESS, 0.01, 0.0)
    assert Counter(picks) == Counter({1: 100, 2: 100, 3: 100, 4: 100})
    assert picks[:8] == [1, 2, 3, 4, 1, 2, 3, 4]


def test_round_robin_skips_replicas_that_are_not_eligible():
    b = balancer(replica(1), replica(2, draining=True), replica(3), policy="round_robin")
    assert [lease(b.choose(0.0)).replica_id for _ in range(4)] == [1, 3, 1, 3]


# Eligibility and reasons


@pytest.mark.parametrize("policy", list(Policy))
def test_every_policy_skips_draining_capped_and_ejected_replicas(policy: Policy):
    b = balancer(replica(1, draining=True), replica(2, max_in_flight=1), replica(3),
                 replica(4), policy=policy)
    lease(b.choose(0.0, exclude=frozenset({1, 3, 4})))
    fail(b, 3, 0.0, times=3)
    assert {lease(b.choose(0.0)).replica_id for _ in range(10)} == {4}


def test_a_replica_at_its_cap_is_skipped_until_a_lease_is_released():
    b = balancer(replica(1, max_in_flight=2))
    first, _ = lease(b.choose(0.0)), lease(b.choose(0.0))
    assert b.choose(0.0) is Unavailable.AT_CAPACITY
    assert not b.has_capacity(0.0)
    first.release(Outcome.SUCCESS, 0.01, 0.1)
    assert b.has_capacity(0.1)
    assert lease(b.choose(0.1)).replica_id == 1


def test_no_replica_at_all_or_only_draining_ones_is_no_replica():
    assert balancer().choose(0.0) is Unavailable.NO_REPLICA
    b = balancer(replica(1, draining=True))
    assert b.choose(0.0) is Unavailable.NO_REPLICA
    assert b.availability(0.0) is Unavailable.NO_REPLICA


def test_a_request_that_tried_every_replica_is_told_so():
    b = balancer(replica(1), replica(2))
    assert b.choose(0.0, exclude=frozenset({1, 2})) is Unavailable.ALL_TRIED


def test_retries_go_to_a_replica_not_tried_yet():
    b = balancer(replica(1), replica(2), replica(3))
    tried: set[int] = set()
    for _ in range(3):
        chosen = lease(b.choose(0.0, exclude=frozenset(tried)))
        assert chosen.replica_id not in tried
        tried.add(chosen.replica_id)
        chosen.release(Outcome.FAILURE, 0.01, 0.0)
    assert b.choose(0.0, exclude=frozenset(tried)) is Unavailable.ALL_TRIED


def test_choose_can_be_limited_to_one_version():
    b = balancer(replica(1, version=1), replica(2, version=2))
    assert {lease(b.choose(0.0, version=2)).replica_id for _ in range(5)} == {2}
    assert b.choose(0.0, version=3) is Unavailable.NO_REPLICA


def test_draining_a_replica_in_place_keeps_its_in_flight_count():
    b = balancer(replica(1), replica(2))
    held = lease(b.choose(0.0, exclude=frozenset({2})))
    b.update_replicas([replica(1, draining=True), replica(2)])
    assert outstanding(b) == {1: 1, 2: 0}
    assert {lease(b.choose(0.0)).replica_id for _ in range(5)} == {2}
    held.release(Outcome.SUCCESS, 0.01, 0.1)
    assert outstanding(b)[1] == 0


# Ejection


def test_a_replica_is_ejected_after_consecutive_failures_and_readmitted_after_back_off():
    b = balancer(replica(1), replica(2), failures_to_eject=3, ejection_base_s=10.0)
    fail(b, 1, 100.0, times=2)
    assert not state_of(b, 1).is_ejected(100.0)
    fail(b, 1, 100.0)
    assert state_of(b, 1).ejected_until_s == 110.0
    assert {lease(b.choose(105.0)).replica_id for _ in range(10)} == {2}
    assert 1 in {lease(b.choose(110.0)).replica_id for _ in range(20)}


def test_a_success_between_failures_resets_the_count():
    b = balancer(replica(1), replica(2), failures_to_eject=3)
    fail(b, 1, 0.0, times=2)
    lease(b.choose(0.0, exclude=frozenset({2}))).release(Outcome.SUCCESS, 0.01, 0.0)
    fail(b, 1, 0.0, times=2)
    assert state_of(b, 1).consecutive_failures == 2
    assert not state_of(b, 1).is_ejected(0.0)


def test_back_off_doubles_on_each_ejection_up_to_the_maximum():
    b = balancer(replica(1), replica(2), failures_to_eject=3, ejection_base_s=1.0,
                 ejection_max_s=8.0)
    now_s, backoffs = 0.0, []
    fail(b, 1, now_s, times=3)
    for _ in range(5):
        backoffs.append(state_of(b, 1).ejected_until_s - now_s)
        now_s = state_of(b, 1).ejected_until_s
        fail(b, 1, now_s)  # readmitted, fails again: straight back out
    assert backoffs == [1.0, 2.0, 4.0, 8.0, 8.0]


def test_a_success_after_readmission_resets_the_back_off():
    b = balancer(replica(1), replica(2), ejection_base_s=1.0)
    fail(b, 1, 0.0, times=3)
    fail(b, 1, 1.0)
    assert state_of(b, 1).ejected_until_s == 3.0
    lease(b.choose(3.0, exclude=frozenset({2}))).release(Outcome.SUCCESS, 0.01, 3.0)
    fail(b, 1, 3.0, times=3)
    assert state_of(b, 1).ejected_until_s == 4.0


def test_cancelled_requests_never_eject_a_replica():
    b = balancer(replica(1), replica(2), failures_to_eject=1)
    for _ in range(10):
        chosen = lease(b.choose(0.0, exclude=frozenset({2})))
        chosen.release(Outcome.CANCELLED, 5.0, 0.0)
    state = state_of(b, 1)
    assert (state.consecutive_failures, state.is_ejected(0.0), state.outstanding) == (0, False, 0)
    assert state.ewma_latency_s is None


def test_timeouts_count_towards_ejection_unless_configured_otherwise():
    counted = balancer(replica(1), replica(2), failures_to_eject=2)
    ignored = balancer(replica(1), replica(2), failures_to_eject=2,
                       timeouts_count_as_failures=False)
    for b in (counted, ignored):
        for _ in range(2):
            lease(b.choose(0.0, exclude=frozenset({2}))).release(Outcome.TIMEOUT, 30.0, 30.0)
    assert state_of(counted, 1).is_ejected(30.0)
    assert not state_of(ignored, 1).is_ejected(30.0)
    assert state_of(ignored, 1).ewma_latency_s == 30.0


def test_when_every_replica_is_ejected_the_least_recently_failed_one_still_serves():
    b = balancer(replica(1), replica(2), replica(3), failures_to_eject=1, ejection_base_s=60.0)
    fail(b, 2, 1.0)
    fail(b, 1, 2.0)
    fail(b, 3, 3.0)
    assert lease(b.choose(4.0)).replica_id == 2
    assert lease(b.choose(4.0, exclude=frozenset({2}))).replica_id == 1


def test_no_panic_while_a_healthy_replica_is_only_busy_or_already_tried():
    b = balancer(replica(1), replica(2, max_in_flight=1), failures_to_eject=1)
    fail(b, 1, 0.0)
    lease(b.choose(0.0))  # replica 2 is now at its cap
    assert b.choose(0.0) is Unavailable.AT_CAPACITY
    assert b.choose(0.0, exclude=frozenset({2})) is Unavailable.ALL_TRIED


# Exact in-flight accounting


def test_releasing_twice_counts_once():
    b = balancer(replica(1), failures_to_eject=1)
    chosen = lease(b.choose(0.0))
    assert chosen.release(Outcome.SUCCESS, 0.01, 0.0) is True
    assert chosen.release(Outcome.FAILURE, 0.01, 0.0) is False
    assert chosen.released
    state = state_of(b, 1)
    assert (state.outstanding, state.consecutive_failures) == (0, 0)


def test_an_unknown_outcome_raises_and_leaves_the_lease_open():
    b = balancer(replica(1))
    chosen = lease(b.choose(0.0))
    with pytest.raises(ValueError):
        chosen.release("exploded", 0.01, 0.0)
    assert chosen.release("success", 0.01, 0.0)
    assert b.in_flight() == 0


def test_a_lease_on_a_removed_replica_releases_without_resurrecting_it():
    b = balancer(replica(1), replica(2), failures_to_eject=1)
    held = lease(b.choose(0.0, exclude=frozenset({2})))
    b.update_replicas([replica(2)])
    assert held.state.detached
    held.release(Outcome.FAILURE, 0.01, 0.0)
    assert held.state.outstanding == 0
    assert outstanding(b) == {2: 0}
    b.update_replicas([replica(1), replica(2)])  # back again: a fresh start
    assert state_of(b, 1) is not held.state
    assert state_of(b, 1).outstanding == 0 and not state_of(b, 1).is_ejected(0.0)


def test_a_replica_that_moves_to_another_address_starts_afresh():
    b = balancer(replica(1))
    held = lease(b.choose(0.0))
    b.update_replicas([RoutableReplica(1, "10.0.0.9:9001")])
    assert state_of(b, 1).outstanding == 0
    held.release(Outcome.SUCCESS, 0.01, 0.0)
    assert state_of(b, 1).outstanding == 0 and held.state.outstanding == 0


def test_a_replica_listed_twice_is_refused():
    with pytest.raises(ValueError, match="listed twice"):
        balancer(replica(1), replica(1))


OUTCOMES = list(Outcome)
OPERATION_WEIGHTS = (6, 5, 1, 1, 1)  # choose, release, release again, new table, time


def run_operations(ops: Sequence[tuple[int, int, int]], policy: Policy) -> None:
    """Interpret (kind, a, c) triples against a balancer, checking counts after each."""
    b = balancer(replica(1), replica(2), replica(3, max_in_flight=2), policy=policy,
                 failures_to_eject=2, ejection_base_s=1.0)
    leases: list[Lease] = []
    seen: dict[int, ReplicaState] = {id(s): s for s in b.replicas}
    now_s = 0.0
    for kind, a, c in ops:
        open_leases = [one for one in leases if not one.released]
        if kind == 0:  # choose, excluding the replicas whose bits are set in a
            tried = frozenset(i for i in range(1, 5) if a >> i & 1)
            result = b.choose(now_s, exclude=tried)
            if isinstance(result, Lease):
                leases.append(result)
        elif kind == 1 and open_leases:  # release an open lease with some outcome
            open_leases[a % len(open_leases)].release(OUTCOMES[c % 4], c / 100, now_s)
        elif kind == 2 and leases:  # release any lease: often a second time
            leases[a % len(leases)].release(OUTCOMES[c % 4], c / 100, now_s)
        elif kind == 3:  # new routing table: a subset of replicas 1..4, some draining
            b.update_replicas(replica(i, draining=c >> i & 3 == 3, max_in_flight=2 if i == 3
                                      else None) for i in range(1, 5) if a >> i & 1)
        else:
            now_s += a / 40
        seen.update((id(s), s) for s in b.replicas)
        assert_counts_match(seen.values(), leases)
    for one in leases:
        one.release(Outcome.CANCELLED, 0.0, now_s)
    assert all(s.outstanding == 0 for s in seen.values())


def assert_counts_match(states: Iterable[ReplicaState], leases: list[Lease]) -> None:
    open_by_state = Counter(id(one.state) for one in leases if not one.released)
    for state in states:
        assert state.outstanding == open_by_state[id(state)] >= 0


@pytest.mark.parametrize("policy", list(Policy))
def test_in_flight_counts_stay_exact_over_a_random_mix_of_operations(policy: Policy):
    rng = random.Random(2024)
    ops = [(rng.choices(range(5), OPERATION_WEIGHTS)[0], rng.randrange(32), rng.randrange(400))
           for _ in range(4000)]
    run_operations(ops, policy)


if given is not None:
    OPERATION = st.tuples(st.integers(0, 4), st.integers(0, 31), st.integers(0, 399))

    @settings(max_examples=150, deadline=None)
    @given(st.lists(OPERATION, max_size=120), st.sampled_from(list(Policy)))
    def test_in_flight_counts_stay_exact_for_any_sequence_of_operations(ops, policy):
        run_operations(ops, policy)


# Traffic split


def test_traffic_split_frequencies_match_the_weights():
    rng = random.Random(11)
    draws = Counter(pick_version({1: 90.0, 2: 10.0, 3: 0.0}, rng) for _ in range(20000))
    assert draws[3] == 0
    assert draws[1] / 20000 == pytest.approx(0.9, abs=0.01)
    assert draws[2] / 20000 == pytest.approx(0.1, abs=0.01)


def test_traffic_split_weights_need_not_sum_to_one_hundred():
    rng = random.Random(5)
    draws = Counter(pick_version({7: 0.5, 8: 0.25, 9: 0.25}, rng) for _ in range(20000))
    assert draws[7] / 20000 == pytest.approx(0.5, abs=0.015)
    assert draws[9] / 20000 == pytest.approx(0.25, abs=0.015)


def test_a_zero_weight_version_is_never_chosen_even_at_the_edges():
    class Edge(random.Random):
        def random(self) -> float:
            return 1.0  # past random()'s range, where `random() * total` can round to

    assert pick_version({1: 1.0, 2: 0.0}, Edge()) == 1
    assert pick_version({1: 0.0, 2: 3.0}, Edge()) == 2


@pytest.mark.parametrize("weights", [{}, {1: 0.0}, {1: -1.0, 2: 2.0}, {1: float("nan")}])
def test_traffic_split_refuses_weights_that_cannot_be_drawn(weights: dict[int, float]):
    with pytest.raises(ValueError):
        pick_version(weights, random.Random(0))


def test_a_pinned_version_gets_everything_even_at_zero_weight():
    weights = {1: 100.0, 2: 0.0}
    assert restrict_to_version(weights, 2) == {2: 1.0}
    assert restrict_to_version(weights, 3) == {}
    assert version_for_request(weights, random.Random(0), pinned_version=2) == 2
    assert version_for_request(weights, random.Random(0), pinned_version=3) is None
    assert version_for_request(weights, random.Random(0)) == 1


# Purity


def test_balancing_loads_no_django_and_no_torch():
    code = ("import sys, serving.balancing, serving.traffic; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'django', 'torch'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_a_bad_config_is_refused_with_the_field_name():
    with pytest.raises(ValueError, match="ejection_base_s"):
        BalancerConfig(ejection_base_s=0.0)
    with pytest.raises(ValueError):
        BalancerConfig(policy="fastest")  # type: ignore[arg-type]
