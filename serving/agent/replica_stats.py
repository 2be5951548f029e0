"""The figures a replica's /stats reply carries into each heartbeat, read defensively.

A replica of another version may lack any key, or hold a value of another type: such a
figure is left out (the heartbeat says "unknown"), never sent for the portal to refuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeGuard

from swarm_protocol.agent_messages import ReplicaStatus, field_accepts

_STAT_FIELDS = ("in_flight", "queue_depth", "completed", "failed")
_LATENCY_FIELDS = ("latency_p50_ms", "latency_p99_ms")
# The engine's percentiles under /stats "generation" (its last 60 s; null when none)
# and the ReplicaStatus fields they become.
_GENERATION_LATENCIES = {"ttft_ms_p50": "ttft_p50_ms", "ttft_ms_p99": "ttft_p99_ms",
                         "itl_ms_p50": "itl_p50_ms", "itl_ms_p99": "itl_p99_ms",
                         "queue_ms_p50": "queue_p50_ms"}


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Counters:
    """A replica's cumulative counters at one /stats: (replica clock s, value) each."""

    busy: tuple[float, float] | None = None  # request-seconds in flight
    tokens: tuple[float, float] | None = None  # tokens generated


def read_stats(raw: dict[str, Any], previous: Counters) -> tuple[dict[str, Any], Counters]:
    """Return the ReplicaStatus figures of a /stats reply, rates since `previous`
    included (mean_in_flight, tokens_per_s), and the counters to pass next time."""
    current = Counters(busy_clock(raw), token_clock(raw))
    rates = {"mean_in_flight": _rate(previous.busy, current.busy),
             "tokens_per_s": _rate(previous.tokens, current.tokens)}
    known = {name: rate for name, rate in rates.items() if rate is not None}
    return {**parse_stats(raw), **_acceptable(known)}, current


def parse_stats(raw: dict[str, Any]) -> dict[str, Any]:
    """Return the ReplicaStatus figures from a /stats reply, skipping malformed values."""
    figures: dict[str, Any] = {}
    for name in _STAT_FIELDS:
        value = raw.get(name)
        if _is_number(value) and math.isfinite(value):  # int(inf) would raise
            figures[name] = int(value)
    for name in _LATENCY_FIELDS:
        value = raw.get(name)
        if _is_number(value):
            figures[name] = float(value)
    figures.update(parse_generation(raw.get("generation")))
    return _acceptable(figures)


def parse_generation(raw: Any) -> dict[str, Any]:
    """Return the generation figures of /stats "generation" (an engine's counts), or {}.

    kv_cache_usage is the share of the cache budget reserved (0..1; the engine reserves
    prompt + max_tokens per running sequence, so this is what admission is bound by).
    """
    if not isinstance(raw, dict):
        return {}
    figures: dict[str, Any] = {}
    for key, name in (("running", "running_sequences"), ("waiting", "waiting_sequences")):
        value = raw.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            figures[name] = value
    reserved, limit = raw.get("cache_tokens_reserved"), raw.get("cache_tokens_limit")
    if _is_number(reserved) and _is_number(limit) and limit > 0:
        figures["kv_cache_usage"] = round(min(max(reserved / limit, 0.0), 1.0), 4)
    for key, name in _GENERATION_LATENCIES.items():
        value = raw.get(key)
        if _is_number(value):
            figures[name] = round(float(value), 3)
    return figures


def _acceptable(figures: dict[str, Any]) -> dict[str, Any]:
    """Drop what the portal would refuse (a negative count, NaN): one bad figure must not
    cost the node its heartbeat."""
    return {name: value for name, value in figures.items()
            if field_accepts(ReplicaStatus, name, value)}


def busy_clock(raw: dict[str, Any]) -> tuple[float, float] | None:
    """Return (replica clock s, request-seconds so far) from /stats, or None."""
    return _clock_and(raw, raw.get("in_flight_seconds"))


def token_clock(raw: dict[str, Any]) -> tuple[float, float] | None:
    """Return (replica clock s, tokens generated so far) from /stats, or None."""
    generation = raw.get("generation")
    tokens = generation.get("generated_tokens") if isinstance(generation, dict) else None
    return _clock_and(raw, tokens)


def _clock_and(raw: dict[str, Any], counter: Any) -> tuple[float, float] | None:
    clock_s = raw.get("clock_s")
    if _is_number(clock_s) and _is_number(counter):
        return float(clock_s), float(counter)
    return None


def _rate(previous: tuple[float, float] | None,
          current: tuple[float, float] | None) -> float | None:
    """Return the counter's growth per second between two readings (None: not known)."""
    if previous is None or current is None or current[0] <= previous[0] \
            or current[1] < previous[1]:
        return None  # first poll, or the replica restarted
    return round((current[1] - previous[1]) / (current[0] - previous[0]), 4)


def mean_in_flight(previous: tuple[float, float] | None, raw: dict[str, Any]) -> float | None:
    """Return the mean requests in flight since the previous /stats (None: not known yet)."""
    return _rate(previous, busy_clock(raw))

