"""A bounded history of heartbeat figures per node, in the cache, at three resolutions.

Each range keeps a fixed-size ring per node: one compact sample every `step_s`, the last
`samples` kept (5 s for 6 min, 1 min for 1 h, 5 min for 24 h: at most 72 + 62 + 290
samples a node). Replica counters in a sample are totals, so the rate between two coarse
samples is the true mean over the step; utilisation is the figure at that moment.

Why the cache and not a table: a ring overwritten in place is bounded by construction (no
pruning task to forget), costs no database write per heartbeat, and is shared by every
portal process when the cache is Redis. Only authenticated heartbeats (a node's secret)
call `record`, so nothing unauthenticated grows it. Losing it (a cache restart) loses
charts, never figures the control plane acts on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.core.cache import cache


@dataclass(frozen=True)
class Range:
    name: str  # what the pages send: "5m", "1h", "24h"
    step_s: float
    samples: int

    @property
    def ttl_s(self) -> int:
        """Keep a ring a little longer than it spans: a quiet node's history fades out."""
        return int(self.step_s * self.samples * 1.5) + 60


RANGES = {r.name: r for r in (Range("5m", 5.0, 72), Range("1h", 60.0, 62),
                              Range("24h", 300.0, 290))}
DEFAULT_RANGE = "5m"
HISTORY_STEP_S = RANGES[DEFAULT_RANGE].step_s
HISTORY_SAMPLES = RANGES[DEFAULT_RANGE].samples  # six minutes
HISTORY_TTL_S = RANGES[DEFAULT_RANGE].ttl_s

# {(range name, node id): at_s of the newest sample this process wrote or saw}
_recorded_at_s: dict[tuple[str, int], float] = {}

# A sample: [at_s, [[gpu index, util %, memory used bytes, temperature C, power W], ...],
#            [[replica id, completed, failed, in flight, p50 ms, p99 ms], ...]]
Sample = list[Any]


def _key(node_id: int, range_name: str = DEFAULT_RANGE) -> str:
    # The 5 min ring keeps its old key: a portal upgraded in place keeps its charts.
    suffix = "" if range_name == DEFAULT_RANGE else f":{range_name}"
    return f"dash:history:{node_id}{suffix}"


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
    """Append a sample to each ring whose newest one is a step old; say if the 5 s one took it."""
    sample: Sample | None = None
    recorded = False
    for range_ in RANGES.values():
        if at_s - _recorded_at_s.get((range_.name, node_id), 0.0) < range_.step_s:
            continue
        sample = sample or compact(at_s, devices, replicas)
        wrote = _append(node_id, range_, sample)
        recorded = recorded or (wrote and range_.name == DEFAULT_RANGE)
    return recorded


def _append(node_id: int, range_: Range, sample: Sample) -> bool:
    """Append to one ring unless another process already did within the step."""
    key = _key(node_id, range_.name)
    samples = cache.get(key) or []
    newest_s = samples[-1][0] if samples else 0.0
    if range_.name != DEFAULT_RANGE and sample[0] - newest_s < range_.step_s:
        _recorded_at_s[(range_.name, node_id)] = newest_s  # another process wrote it
        return False
    _recorded_at_s[(range_.name, node_id)] = sample[0]
    samples.append(sample)
    cache.set(key, samples[-range_.samples:], range_.ttl_s)
    return True


def histories(node_ids: list[int], range_name: str = DEFAULT_RANGE) -> dict[int, list[Sample]]:
    """Return one range's samples of many nodes in one cache round trip (KeyError: no range)."""
    if range_name not in RANGES:
        raise KeyError(range_name)
    keys = {_key(node_id, range_name): node_id for node_id in node_ids}
    return {keys[key]: value for key, value in cache.get_many(list(keys)).items()}


def forget(node_id: int) -> None:
    for name in RANGES:
        _recorded_at_s.pop((name, node_id), None)
    cache.delete_many([_key(node_id, name) for name in RANGES])
