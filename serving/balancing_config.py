"""What the balancer (balancing.py) is told: its policy and limits per deployment, the
replicas the routing table lists, and the outcomes and refusals it speaks in (pure: no
Django). Each table refresh builds these; the balancer keeps its own state beside them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from serving.affinity import DEFAULT_SLACK


class Policy(StrEnum):
    P2C_EWMA = "p2c_ewma"
    LEAST_OUTSTANDING = "least_outstanding"
    ROUND_ROBIN = "round_robin"


class Outcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"  # connection error, reset, 502/503 from the replica
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"  # the client went away: says nothing about the replica


class Unavailable(StrEnum):
    """Why `choose` found no replica; each asks the gateway for a different answer."""

    NO_REPLICA = "no_replica"  # nothing ready (none, or all draining): 503 now, or cold start
    ALL_TRIED = "all_tried"  # this request already tried every usable replica: stop retrying
    AT_CAPACITY = "at_capacity"  # usable replicas exist but all are at their cap: wait


@dataclass(frozen=True, slots=True)
class BalancerConfig:
    """How one deployment balances; validated on construction."""

    policy: Policy = Policy.P2C_EWMA
    ewma_half_life_s: float = 5.0
    default_latency_s: float = 0.05  # the price of a replica before any latency is known
    # Prices this close (a fraction of the lower one) are noise, not a reason to prefer one.
    tie_fraction: float = 0.2
    # An idle replica's estimate moves halfway back to the deployment's per this many
    # latency samples taken on other replicas.
    drift_half_life_requests: float = 10.0
    min_sample_weight: float = 0.05  # of each latency sample in an EWMA, however soon it came
    failures_to_eject: int = 3
    ejection_base_s: float = 5.0
    ejection_max_s: float = 300.0
    # A timeout usually means a hung or overloaded replica; Envoy counts it as a gateway error.
    timeouts_count_as_failures: bool = True
    # Prefix affinity (serving/affinity.py): how far above the least loaded replica's
    # outstanding count the prefix's own replica may be and still take the request.
    affinity_slack: int = DEFAULT_SLACK

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", Policy(self.policy))
        positive = ("ewma_half_life_s", "default_latency_s", "ejection_base_s", "ejection_max_s",
                "drift_half_life_requests")
        for name in positive:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if not 0 <= self.min_sample_weight <= 1:
            raise ValueError(f"min_sample_weight must lie in [0, 1], got "
                             f"{self.min_sample_weight!r}")
        if not (math.isfinite(self.tie_fraction) and self.tie_fraction >= 0):
            raise ValueError(f"tie_fraction must be a non-negative number, got "
                             f"{self.tie_fraction!r}")
        if self.affinity_slack < 0:
            raise ValueError(f"affinity_slack must be at least 0, got {self.affinity_slack}")
        if self.failures_to_eject < 1:
            raise ValueError(f"failures_to_eject must be at least 1, got {self.failures_to_eject}")
        if self.ejection_max_s < self.ejection_base_s:
            raise ValueError("ejection_max_s must not be below ejection_base_s")


@dataclass(frozen=True, slots=True)
class RoutableReplica:
    """One replica as the routing table lists it; `replica_id` + `address` is its identity."""

    replica_id: int
    address: str  # "host:port" the gateway connects to
    version: int = 0
    max_in_flight: int | None = None  # None: no cap
    draining: bool = False
