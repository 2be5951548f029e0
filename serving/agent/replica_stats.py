"""The figures a replica's /stats reply carries into each heartbeat, read defensively."""

from __future__ import annotations

from typing import Any

_STAT_FIELDS = ("in_flight", "queue_depth", "completed", "failed")
_LATENCY_FIELDS = ("latency_p50_ms", "latency_p99_ms")


def parse_stats(raw: dict[str, Any]) -> dict[str, Any]:
    """Return the ReplicaStatus figures from a /stats reply, skipping malformed values."""
    figures: dict[str, Any] = {}
    for name in _STAT_FIELDS:
        value = raw.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            figures[name] = int(value)
    for name in _LATENCY_FIELDS:
        value = raw.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            figures[name] = float(value)
    return figures


def busy_clock(raw: dict[str, Any]) -> tuple[float, float] | None:
    clock_s, busy_s = raw.get("clock_s"), raw.get("in_flight_seconds")
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in (clock_s, busy_s)):
        return float(clock_s), float(busy_s)  # type: ignore[arg-type]
    return None


def mean_in_flight(previous: tuple[float, float] | None, raw: dict[str, Any]) -> float | None:
    """Return the mean requests in flight since the previous /stats (None: not known yet)."""
    current = busy_clock(raw)
    if previous is None or current is None or current[0] <= previous[0] \
            or current[1] < previous[1]:
        return None  # first poll, or the replica restarted
    return round((current[1] - previous[1]) / (current[0] - previous[0]), 4)
