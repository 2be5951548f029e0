"""The operator's scaling settings for one deployment, checked (pure: no Django).

Split from scaling/policy.py, which re-exports ScalingPolicyConfig and the metric names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# What a policy counts as one replica's demand:
# - in_flight: requests in flight (mean since the last heartbeat), queued ones included;
# - sequences: a generative replica's running plus waiting sequences (its engine's counts:
#   one request can hold a slot for seconds, and the waiting ones are the backlog).
METRIC_IN_FLIGHT = "in_flight"
METRIC_SEQUENCES = "sequences"
METRICS = (METRIC_IN_FLIGHT, METRIC_SEQUENCES)


@dataclass(frozen=True)
class ScalingPolicyConfig:
    """The operator's scaling settings for one deployment."""

    min_replicas: int
    max_replicas: int
    target_in_flight_per_replica: float
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    scale_down_delay_s: float = 30.0
    max_step_up: int | None = None
    max_step_down: int | None = None
    scale_to_zero: bool = False
    idle_before_zero_s: float = 300.0
    # Scale down only to a count that serves the stable demand with this share to
    # spare, so demand wandering around a boundary does not flap (Kubernetes' HPA
    # keeps a 10% band the same way).
    scale_down_tolerance: float = 0.1
    metric: str = METRIC_IN_FLIGHT
    # The target when metric is "sequences": running + waiting per replica. Below the
    # engine's slots (SWARM_REPLICA_MAX_SEQUENCES, 16) so a replica is added before
    # sequences queue for long.
    target_sequences_per_replica: float = 12.0

    def __post_init__(self) -> None:
        problems = _config_problems(self)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def active_floor(self) -> int:
        """Return the fewest replicas while the deployment is not idle at zero."""
        return max(1, self.min_replicas)

    @property
    def target_per_replica(self) -> float:
        """Return the demand one replica should carry, in the metric's unit."""
        if self.metric == METRIC_SEQUENCES:
            return self.target_sequences_per_replica
        return self.target_in_flight_per_replica

    @property
    def unit(self) -> str:
        """Return the demand's unit as reasons name it ("" for requests in flight, as
        before the metric could be chosen)."""
        return " sequences" if self.metric == METRIC_SEQUENCES else ""


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _config_problems(config: ScalingPolicyConfig) -> list[str]:
    problems = [f"{name}: must be an integer, got {getattr(config, name)!r}"
                for name in ("min_replicas", "max_replicas")
                if not is_int(getattr(config, name))]
    problems += [f"{name}: must be a finite number, got {getattr(config, name)!r}"
                 for name in ("target_in_flight_per_replica", "stable_window_s",
                              "panic_window_s", "panic_threshold", "scale_down_delay_s",
                              "idle_before_zero_s", "scale_down_tolerance",
                              "target_sequences_per_replica")
                 if not is_number(getattr(config, name))]
    problems += [f"{name}: must be None or an integer >= 1, got {getattr(config, name)!r}"
                 for name in ("max_step_up", "max_step_down")
                 if getattr(config, name) is not None
                 and not (is_int(getattr(config, name)) and getattr(config, name) >= 1)]
    if not isinstance(config.scale_to_zero, bool):
        problems.append(f"scale_to_zero: must be a bool, got {config.scale_to_zero!r}")
    if config.metric not in METRICS:
        problems.append(f"metric: must be one of {', '.join(METRICS)}, got {config.metric!r}")
    return problems or _range_problems(config)


def _range_problems(config: ScalingPolicyConfig) -> list[str]:
    checks = [
        (config.min_replicas >= 0, "min_replicas: must be >= 0"),
        (config.min_replicas >= 1 or config.scale_to_zero,
         "min_replicas: may be 0 only when scale_to_zero is set"),
        (config.max_replicas >= max(1, config.min_replicas),
         "max_replicas: must be >= max(1, min_replicas)"),
        (config.target_in_flight_per_replica > 0, "target_in_flight_per_replica: must be > 0"),
        (config.target_sequences_per_replica > 0, "target_sequences_per_replica: must be > 0"),
        (config.stable_window_s > 0, "stable_window_s: must be > 0"),
        (0 < config.panic_window_s <= config.stable_window_s,
         "panic_window_s: must be > 0 and <= stable_window_s"),
        (config.panic_threshold >= 1, "panic_threshold: must be >= 1"),
        (config.scale_down_delay_s >= 0, "scale_down_delay_s: must be >= 0"),
        (config.idle_before_zero_s >= 0, "idle_before_zero_s: must be >= 0"),
        (0 <= config.scale_down_tolerance < 1, "scale_down_tolerance: must be >= 0 and < 1"),
    ]
    return [message for ok, message in checks if not ok]
