"""What `GET /stats` reports (pure: the clock is passed in).

Counters (completed, failed, batches, batched_rows) are totals since the process started,
so a poller can take differences; latency percentiles cover the last `window_requests`
successful requests that finished within the last `window_s` seconds.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

STATES = ("loading", "ready", "draining")


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of an ascending, non-empty list."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class ReplicaStats:
    """Counters and a recent latency window."""

    window_requests: int = 1000
    window_s: float = 60.0
    completed: int = 0
    failed: int = 0
    batches: int = 0
    batched_rows: int = 0
    _latencies: deque[tuple[float, float]] = field(default_factory=deque, repr=False)

    def record_success(self, now_s: float, latency_ms: float) -> None:
        """Count a successful request and keep its latency."""
        self.completed += 1
        self._latencies.append((now_s, latency_ms))
        if len(self._latencies) > self.window_requests:
            self._latencies.popleft()

    def record_failure(self) -> None:
        """Count a request that the model failed."""
        self.failed += 1

    def record_batch(self, rows: int) -> None:
        """Count one forward pass of `rows` rows."""
        self.batches += 1
        self.batched_rows += rows

    def recent_latencies_ms(self, now_s: float) -> list[float]:
        """Return the window's latencies, ascending, dropping those that are too old."""
        horizon_s = now_s - self.window_s
        while self._latencies and self._latencies[0][0] < horizon_s:
            self._latencies.popleft()
        return sorted(latency for _, latency in self._latencies)

    def snapshot(self, now_s: float, state: str, in_flight: int,
                 queue_depth: int) -> dict[str, Any]:
        """Return the /stats document."""
        latencies = self.recent_latencies_ms(now_s)
        return {
            "state": state,
            "in_flight": in_flight,
            "queue_depth": queue_depth,
            "completed": self.completed,
            "failed": self.failed,
            "latency_p50_ms": round(percentile(latencies, 0.5), 3) if latencies else None,
            "latency_p99_ms": round(percentile(latencies, 0.99), 3) if latencies else None,
            "batches": self.batches,
            "batched_rows": self.batched_rows,
        }
