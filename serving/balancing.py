"""Pick a replica for each inference attempt and learn from how it went (pure: no Django).

One `Balancer` per deployment. The gateway calls `choose()` for every attempt and
`Lease.release()` when that attempt ends. Time (`now_s`, monotonic seconds) and randomness
(a `random.Random`) come from the caller, so tests and the simulator drive it exactly.
Not thread-safe: it lives on the gateway's event loop and never awaits.

Choices:
- Latency is a time-decayed EWMA with a half-life, as in Finagle/Linkerd: a sample's weight
  depends on the time since the previous one, so busy and idle replicas forget at the same
  pace. A replica with no samples yet is priced at the deployment-wide EWMA, so a new
  replica looks average instead of free (a burst) or slow (starved).
- Exploration: an estimate not refreshed for a while says less and less, so a replica's
  price drifts back toward the deployment-wide EWMA while other replicas serve: by half
  per `ewma_half_life_s` and per `drift_half_life_requests` samples taken elsewhere
  (time alone is too slow at high rates). Prices within `tie_fraction` of each other are a
  tie, won by the random first draw. Without both, sequential requests (nothing
  outstanding) stick to whichever replica's first sample happened to be lower, forever.
- Panic: when every ready replica is ejected, the least recently failed one still gets
  traffic (Envoy's panic threshold at 0%): a likely-recovered replica beats a certain 503.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

from serving.affinity import affinity_choice
from serving.balancing_config import (
    BalancerConfig,
    Outcome,
    Policy,
    RoutableReplica,
    Unavailable,
)

# The config and the table's shapes live in balancing_config.py; importers take them here.
__all__ = ["Balancer", "BalancerConfig", "Lease", "Outcome", "Policy", "ReplicaState",
           "RoutableReplica", "Unavailable"]


@dataclass(slots=True, eq=False)
class ReplicaState:
    """What the balancer knows about one replica; read it, never write it from outside."""

    replica: RoutableReplica
    outstanding: int = 0
    ewma_latency_s: float | None = None  # None: no sample yet
    last_sample_s: float = -math.inf
    last_sample_number: int = 0  # the deployment's sample count at this replica's last one
    consecutive_failures: int = 0
    ejections: int = 0  # ejections since the last success: sets the next back-off
    ejected_until_s: float = -math.inf
    last_failure_s: float = -math.inf
    detached: bool = False  # gone from the routing table; its leases still release here

    @property
    def cap(self) -> float:
        cap = self.replica.max_in_flight
        return math.inf if cap is None else cap

    def is_ejected(self, now_s: float) -> bool:
        """Return whether the replica sits out at `now_s`."""
        return now_s < self.ejected_until_s


def _blend_s(old_s: float, old_at_s: float, sample_s: float, now_s: float,
             half_life_s: float, min_weight: float) -> float:
    # The old value keeps half its weight per half-life elapsed since it was last updated,
    # but a sample always counts for at least `min_weight`: at hundreds of requests a
    # second, time alone would freeze an estimate at its first sample for seconds.
    age_s = now_s - old_at_s
    keep = math.exp2(-age_s / half_life_s) if age_s > 0.0 else 1.0
    max_keep = 1.0 - min_weight
    return sample_s + (old_s - sample_s) * (keep if keep < max_keep else max_keep)


def _eligible(state: ReplicaState, now_s: float, exclude: frozenset[int],
              version: int | None) -> bool:
    replica = state.replica
    return (not replica.draining
            and state.outstanding < state.cap
            and now_s >= state.ejected_until_s
            and (version is None or replica.version == version)
            and replica.replica_id not in exclude)


class Lease:
    """One attempt on one replica; release it exactly once when the attempt ends."""

    __slots__ = ("_balancer", "_released", "started_s", "state")

    def __init__(self, balancer: Balancer, state: ReplicaState, started_s: float) -> None:
        self._balancer = balancer
        self._released = False
        self.state = state
        self.started_s = started_s

    @property
    def replica_id(self) -> int:
        return self.state.replica.replica_id

    @property
    def address(self) -> str:
        return self.state.replica.address

    @property
    def version(self) -> int:
        return self.state.replica.version

    @property
    def released(self) -> bool:
        return self._released

    def release(self, outcome: Outcome | str, latency_s: float, now_s: float) -> bool:
        """Record how the attempt went; return False, changing nothing, if already released."""
        if self._released:
            return False
        if outcome.__class__ is not Outcome:  # the enum call costs ~0.5 us: only for strings
            outcome = Outcome(outcome)  # an unknown outcome raises before anything changes
        self._released = True
        self._balancer._settle(self.state, outcome, latency_s, now_s)
        return True

    def __repr__(self) -> str:
        return f"<Lease replica={self.replica_id} released={self._released}>"


class Balancer:
    """Spread one deployment's requests over its replicas."""

    def __init__(self, rng: random.Random, config: BalancerConfig | None = None) -> None:
        self.config = config or BalancerConfig()
        self._rng = rng
        self._table: tuple[ReplicaState, ...] = ()
        self._cursor = 0  # where round robin (and least-outstanding ties) look first
        self._fleet_latency_s = self.config.default_latency_s
        self._fleet_sample_s = -math.inf
        self._samples = 0  # latency samples taken on any replica: the drift's other clock
        self._derive_constants()

    def _derive_constants(self) -> None:
        # Read on every pick: plain attributes cost less than config lookups and divisions.
        config = self.config
        self._halvings_per_s = 1.0 / config.ewma_half_life_s
        self._halvings_per_sample = 1.0 / config.drift_half_life_requests
        self._tie = 1.0 + config.tie_fraction

    @property
    def replicas(self) -> tuple[ReplicaState, ...]:
        """Return the state of every replica in the routing table, in table order."""
        return self._table

    def in_flight(self) -> int:
        """Return the attempts in flight on replicas still in the routing table."""
        return sum(state.outstanding for state in self._table)

    def reconfigure(self, config: BalancerConfig) -> None:
        """Switch policy or thresholds, keeping everything learnt about the replicas."""
        self.config = config
        self._derive_constants()

    def update_replicas(self, replicas: Iterable[RoutableReplica]) -> None:
        """Adopt a new routing table, keeping what was learnt about replicas still in it."""
        old = {state.replica.replica_id: state for state in self._table}
        table: list[ReplicaState] = []
        seen: set[int] = set()
        for replica in replicas:
            if replica.replica_id in seen:
                raise ValueError(f"replica {replica.replica_id} is listed twice")
            seen.add(replica.replica_id)
            state = old.pop(replica.replica_id, None)
            if state is not None and state.replica.address == replica.address:
                state.replica = replica  # draining, cap or version may have changed
            else:
                # Another address is another process: what we learnt was about the old one.
                if state is not None:
                    state.detached = True
                state = ReplicaState(replica)
            table.append(state)
        for gone in old.values():
            gone.detached = True  # its leases release into the detached state, harmlessly
        self._table = tuple(table)

    def choose(self, now_s: float, exclude: frozenset[int] = frozenset(),
               version: int | None = None, affinity: bytes | None = None) -> Lease | Unavailable:
        """Return a lease on the replica for one attempt, or why there is none.

        `affinity` (serving/affinity.prefix_key): requests with the same key go to the same
        replica while its load allows; None: the deployment's policy alone decides.
        """
        state = (self._pick(now_s, exclude, version) if affinity is None
                 else self._pick_affine(now_s, exclude, version, affinity))
        if state is None:
            reason, state = self._fallback(now_s, exclude, version)
            if state is None:
                return reason
        state.outstanding += 1
        return Lease(self, state, now_s)

    def availability(self, now_s: float, exclude: frozenset[int] = frozenset(),
                     version: int | None = None) -> Unavailable | None:
        """Return why `choose` would find no replica now, or None when it would find one."""
        if any(_eligible(state, now_s, exclude, version) for state in self._table):
            return None
        reason, state = self._fallback(now_s, exclude, version)
        return None if state is not None else reason

    def has_capacity(self, now_s: float, version: int | None = None) -> bool:
        """Return whether a new request could start on some replica now."""
        return self.availability(now_s, version=version) is None

    def _pick(self, now_s: float, exclude: frozenset[int],
              version: int | None) -> ReplicaState | None:
        policy = self.config.policy
        if policy is Policy.ROUND_ROBIN:
            return self._pick_round_robin(now_s, exclude, version)
        if policy is Policy.LEAST_OUTSTANDING:
            return self._pick_least_outstanding(now_s, exclude, version)
        return self._pick_p2c(now_s, exclude, version)

    def _pick_p2c(self, now_s: float, exclude: frozenset[int],
                  version: int | None) -> ReplicaState | None:
        table = self._table
        if len(table) == 1:  # the common small case: no list, no draw
            return table[0] if _eligible(table[0], now_s, exclude, version) else None
        eligible = [s for s in table if _eligible(s, now_s, exclude, version)]
        if len(eligible) < 2:
            return eligible[0] if eligible else None
        # Two distinct indices, uniformly: draw the second from the n - 1 others.
        first = self._rng.randrange(len(eligible))
        second = self._rng.randrange(len(eligible) - 1)
        if second >= first:
            second += 1
        a, b = eligible[first], eligible[second]
        price_a, price_b = self._price_s(a, now_s), self._price_s(b, now_s)
        tie = self._tie
        if price_a <= price_b * tie and price_b <= price_a * tie:
            price_a = price_b  # latency noise: only the outstanding counts decide
        # `a` is the random draw: it wins ties, so equal replicas share the load.
        return a if (a.outstanding + 1) * price_a <= (b.outstanding + 1) * price_b else b

    def _pick_affine(self, now_s: float, exclude: frozenset[int], version: int | None,
                     affinity: bytes) -> ReplicaState | None:
        eligible = {s.replica.replica_id: s for s in self._table
                    if _eligible(s, now_s, exclude, version)}
        chosen = affinity_choice(affinity, {rid: s.outstanding for rid, s in eligible.items()},
                                 self.config.affinity_slack)
        return None if chosen is None else eligible[chosen]

    def _price_s(self, state: ReplicaState, now_s: float) -> float:
        """Return a replica's latency estimate, drifted toward the deployment's with age."""
        latency_s = state.ewma_latency_s
        if latency_s is None:
            return self._fleet_latency_s
        age_s = now_s - state.last_sample_s
        halvings = ((self._samples - state.last_sample_number) * self._halvings_per_sample
                    + (age_s * self._halvings_per_s if age_s > 0.0 else 0.0))
        if halvings <= 0.0:
            return latency_s
        fleet_s = self._fleet_latency_s
        return fleet_s + (latency_s - fleet_s) * math.exp2(-halvings)

    def _pick_round_robin(self, now_s: float, exclude: frozenset[int],
                          version: int | None) -> ReplicaState | None:
        table = self._table
        for step in range(len(table)):
            index = (self._cursor + step) % len(table)
            if _eligible(table[index], now_s, exclude, version):
                self._cursor = index + 1
                return table[index]
        return None

    def _pick_least_outstanding(self, now_s: float, exclude: frozenset[int],
                                version: int | None) -> ReplicaState | None:
        # Scanning from a rotating start breaks ties in turn, without spending randomness.
        table = self._table
        best_index = -1
        for step in range(len(table)):
            index = (self._cursor + step) % len(table)
            state = table[index]
            if _eligible(state, now_s, exclude, version) and (
                    best_index < 0 or state.outstanding < table[best_index].outstanding):
                best_index = index
        if best_index < 0:
            return None
        self._cursor = best_index + 1
        return table[best_index]

    def _fallback(self, now_s: float, exclude: frozenset[int],
                  version: int | None) -> tuple[Unavailable, ReplicaState | None]:
        # The slow path, taken only when no replica is eligible: say why, or panic.
        ready = [s for s in self._table if not s.replica.draining
                 and (version is None or s.replica.version == version)]
        if not ready:
            return Unavailable.NO_REPLICA, None
        untried = [s for s in ready if s.replica.replica_id not in exclude]
        if not untried:
            return Unavailable.ALL_TRIED, None
        if any(not s.is_ejected(now_s) for s in ready):
            # Not a panic: healthy replicas exist, so wait for them or give up on them.
            if any(not s.is_ejected(now_s) for s in untried):
                return Unavailable.AT_CAPACITY, None
            return Unavailable.ALL_TRIED, None
        open_ = [s for s in untried if s.outstanding < s.cap]
        if not open_:
            return Unavailable.AT_CAPACITY, None
        return Unavailable.AT_CAPACITY, min(open_, key=lambda s: s.last_failure_s)

    def _settle(self, state: ReplicaState, outcome: Outcome, latency_s: float,
                now_s: float) -> None:
        state.outstanding -= 1
        if outcome is Outcome.CANCELLED:
            return
        if outcome is not Outcome.FAILURE:
            # A timeout's latency is a lower bound, still worth pricing in; a failure's is
            # not: fast errors would make a broken replica look like the best one.
            self._observe_latency(state, latency_s, now_s)
        if outcome is Outcome.SUCCESS:
            state.consecutive_failures = 0
            state.ejections = 0
            return
        if outcome is Outcome.TIMEOUT and not self.config.timeouts_count_as_failures:
            return
        self._count_failure(state, now_s)

    def _observe_latency(self, state: ReplicaState, latency_s: float, now_s: float) -> None:
        if not latency_s >= 0.0:  # NaN or negative: a caller bug must not poison the EWMA
            return
        half_life_s = self.config.ewma_half_life_s
        # What the estimate had drifted to is what the new sample refines.
        old_s = None if state.ewma_latency_s is None else self._price_s(state, now_s)
        min_weight = self.config.min_sample_weight
        state.ewma_latency_s = latency_s if old_s is None else _blend_s(
            old_s, state.last_sample_s, latency_s, now_s, half_life_s, min_weight)
        state.last_sample_s = now_s
        self._samples += 1
        state.last_sample_number = self._samples
        self._fleet_latency_s = _blend_s(
            self._fleet_latency_s, self._fleet_sample_s, latency_s, now_s, half_life_s,
            min_weight)
        self._fleet_sample_s = now_s

    def _count_failure(self, state: ReplicaState, now_s: float) -> None:
        state.consecutive_failures += 1
        state.last_failure_s = now_s
        # The count is not reset on ejection: a readmitted replica that fails again goes
        # straight back out, for twice as long, instead of failing N more requests first.
        if state.consecutive_failures < self.config.failures_to_eject or state.is_ejected(now_s):
            return
        backoff_s = self.config.ejection_base_s * 2.0 ** min(state.ejections, 62)
        state.ejected_until_s = now_s + min(backoff_s, self.config.ejection_max_s)
        state.ejections += 1
