"""A tiny, pruned history of heartbeat figures per node, in the cache, for chart seeds.

One compact sample per node every HISTORY_STEP_S (not every heartbeat), the last
HISTORY_SAMPLES kept, overwritten in place: no database write, bounded size. The throttle
is per process; several portal processes at worst add a few samples, never lose the
latest figures (those stay in serving.live).
"""

from __future__ import annotations

from typing import Any

from django.core.cache import cache

HISTORY_STEP_S = 5.0
HISTORY_SAMPLES = 72  # six minutes
HISTORY_TTL_S = 900

_recorded_at_s: dict[int, float] = {}

# A sample: [at_s, [[gpu index, util %, memory used bytes, temperature C, power W], ...],
#            [[replica id, completed, failed, in flight, p50 ms, p99 ms], ...]]
Sample = list[Any]


def _key(node_id: int) -> str:
    return f"dash:history:{node_id}"


def compact(at_s: float, devices: list[dict[str, Any]],
            replicas: list[dict[str, Any]]) -> Sample:
    """Return the compact sample of one heartbeat."""
    return [round(at_s, 3),
            [[d.get("index"), d.get("utilization_pct"), d.get("memory_used_bytes"),
              d.get("temperature_c"), d.get("power_w")] for d in devices],
            [[r.get("replica_id"), r.get("completed", 0), r.get("failed", 0),
              r.get("in_flight", 0), r.get("latency_p50_ms"), r.get("latency_p99_ms")]
             for r in replicas]]


def record(node_id: int, at_s: float, devices: list[dict[str, Any]],
           replicas: list[dict[str, Any]]) -> bool:
    """Append a sample when the last one of this node is HISTORY_STEP_S old; say if it did."""
    if at_s - _recorded_at_s.get(node_id, 0.0) < HISTORY_STEP_S:
        return False
    _recorded_at_s[node_id] = at_s
    samples = cache.get(_key(node_id)) or []
    samples.append(compact(at_s, devices, replicas))
    cache.set(_key(node_id), samples[-HISTORY_SAMPLES:], HISTORY_TTL_S)
    return True


def histories(node_ids: list[int]) -> dict[int, list[Sample]]:
    """Return the samples of many nodes in one cache round trip."""
    found = cache.get_many([_key(node_id) for node_id in node_ids])
    return {int(key.split(":")[2]): value for key, value in found.items()}


def forget(node_id: int) -> None:
    _recorded_at_s.pop(node_id, None)
    cache.delete(_key(node_id))
