"""Chart figures from heartbeat samples: pure functions, no Django.

Replica counters (completed, failed) are totals since the replica started, so rates are
differences between two samples of the same replica over the time between them; a counter
that went down means the replica restarted, and that pair is skipped. The browser does the
same sums on live heartbeats (static/js/dashboards.js); these seed the charts on page load.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

Sample = list[Any]  # see dashboards.history.compact


@dataclass
class ReplicaRate:
    requests_per_s: float
    errors_per_s: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None


@dataclass
class Series:
    """Points of one chart: times (s) and one list of values per line."""

    t_s: list[float] = field(default_factory=list)
    lines: dict[str, list[float | None]] = field(default_factory=dict)

    def add(self, t_s: float, values: dict[str, float | None]) -> None:
        self.t_s.append(t_s)
        for name, value in values.items():
            self.lines.setdefault(name, []).append(value)

    def to_dict(self) -> dict[str, Any]:
        return {"t": self.t_s, **self.lines}


def replica_rates(older: Sample, newer: Sample) -> dict[int, ReplicaRate]:
    """Return each replica's request and error rates between two samples of one node."""
    dt_s = newer[0] - older[0]
    if dt_s <= 0:
        return {}
    before = {row[0]: row for row in older[2]}
    rates = {}
    for replica_id, completed, failed, _in_flight, p50, p99 in newer[2]:
        old = before.get(replica_id)
        if old is None or completed < old[1] or failed < old[2]:
            continue
        rates[replica_id] = ReplicaRate((completed - old[1]) / dt_s, (failed - old[2]) / dt_s,
                                        p50, p99)
    return rates


def combine(rates: list[ReplicaRate]) -> dict[str, float | None]:
    """Return the figures of a group of replicas: sums, request-weighted p50, worst p99."""
    requests = sum(r.requests_per_s for r in rates)
    errors = sum(r.errors_per_s for r in rates)
    weighted = [(r.latency_p50_ms, r.requests_per_s) for r in rates if r.latency_p50_ms]
    weight = sum(w for _, w in weighted)
    p50 = (sum(v * w for v, w in weighted) / weight if weight
           else max((v for v, _ in weighted), default=None))
    p99 = max((r.latency_p99_ms for r in rates if r.latency_p99_ms is not None), default=None)
    total = requests + errors
    # No traffic: no error rate (the page shows a dash, the chart a gap), not 0.00 %.
    return {"rps": round(requests, 3), "p50_ms": p50, "p99_ms": p99,
            "error_rate": round(errors / total, 4) if total else None}


def _bucket(t_s: float, step_s: float) -> float:
    return round(t_s / step_s) * step_s


# Two samples further apart than this many steps bracket a stretch without data: their
# rate (averaged over the whole stretch) is no point of the chart, which shows a gap there.
MAX_PAIR_STEPS = 3


def _pairs(samples: list[Sample], step_s: float) -> list[tuple[Sample, Sample]]:
    """Return the consecutive sample pairs close enough to make a rate."""
    return [(older, newer) for older, newer in pairwise(samples)
            if newer[0] - older[0] <= MAX_PAIR_STEPS * step_s]


def deployment_series(histories: dict[int, list[Sample]], deployment_of: dict[int, int],
                      step_s: float, version_of: dict[int, int] | None = None,
                      ) -> dict[int, Series]:
    """Return per deployment: requests/s, p50, p99 and error rate over time.

    With `version_of` ({replica id: version number}), a deployment whose replicas serve
    more than one version (a canary) also gets "rps_v<number>" per version.
    """
    buckets: dict[int, dict[float, list[tuple[int | None, ReplicaRate]]]] = defaultdict(
        lambda: defaultdict(list))
    for samples in histories.values():
        for older, newer in _pairs(samples, step_s):
            for replica_id, rate in replica_rates(older, newer).items():
                deployment_id = deployment_of.get(replica_id)
                if deployment_id is not None:
                    version = (version_of or {}).get(replica_id)
                    buckets[deployment_id][_bucket(newer[0], step_s)].append((version, rate))
    result = {}
    for deployment_id, by_time in buckets.items():
        versions = sorted({v for rows in by_time.values() for v, _ in rows if v is not None})
        series = Series()
        for t_s in sorted(by_time):
            rows = by_time[t_s]
            values = combine([rate for _, rate in rows])
            for number in versions if len(versions) > 1 else ():
                mine = [rate for version, rate in rows if version == number]
                values[f"rps_v{number}"] = combine(mine)["rps"] if mine else None
            series.add(t_s, values)
        result[deployment_id] = series
    return result


def device_series(samples: list[Sample], kinds: dict[int, str] | None = None) -> Series:
    """Return one node's utilisation per device over time ("gpu0", "gpu1", or "cpu0" for
    a CPU device: `kinds` maps device index to "gpu"/"cpu"; unknown ones are GPUs)."""
    kinds = kinds or {}
    indexes = sorted({row[0] for sample in samples for row in sample[1]})
    series = Series()
    for sample in samples:
        by_index = {row[0]: row[1] for row in sample[1]}
        series.add(sample[0], {f"{kinds.get(i, 'gpu')}{i}": by_index.get(i) for i in indexes})
    return series


def fleet_series(histories: dict[int, list[Sample]], step_s: float,
                 kinds: dict[int, dict[int, str]] | None = None,
                 kind: str | None = None) -> Series:
    """Return the whole fleet's mean device utilisation and requests/s over time.

    With `kind` ("gpu" or "cpu"), only devices of that kind count towards utilisation
    (`kinds`: {node id: {device index: kind}}; unknown devices are GPUs).
    """
    utils: dict[float, list[float]] = defaultdict(list)
    rates: dict[float, float] = defaultdict(float)
    for node_id, samples in histories.items():
        node_kinds = (kinds or {}).get(node_id, {})
        for sample in samples:
            utils[_bucket(sample[0], step_s)].extend(
                row[1] for row in sample[1] if row[1] is not None
                and (kind is None or node_kinds.get(row[0], "gpu") == kind))
        for older, newer in _pairs(samples, step_s):
            rates[_bucket(newer[0], step_s)] += sum(
                r.requests_per_s for r in replica_rates(older, newer).values())
    series = Series()
    for t_s in sorted(utils):
        values = utils[t_s]
        series.add(t_s, {"util_pct": round(sum(values) / len(values), 2) if values else None,
                         "rps": round(rates[t_s], 3) if t_s in rates else None})
    return series


def latest_rates(samples: list[Sample]) -> dict[int, ReplicaRate]:
    """Return the replica rates between a node's two newest samples."""
    return replica_rates(samples[-2], samples[-1]) if len(samples) >= 2 else {}
