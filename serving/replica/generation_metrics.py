"""Timings of the generation engine: what it observes, and the recent figures /stats reports.

The engine calls a `GenerationObserver` at each point of a sequence's life (admitted,
a token out, finished), in its own thread, with times from its clock (seconds). Two
observers exist: `RecentTimings` here (pure: bounded windows of the last 60 s, read by
/stats and relayed by the agent's heartbeats) and the Prometheus export
(`prometheus_metrics.py`, for scrapers). Both are fed the same calls, so they agree.

Definitions (those of vLLM's metrics):
- queue time: from submission to admission into the running batch;
- time to first token (TTFT): from submission to the first sampled token;
- inter-token latency (ITL): between two consecutive tokens of one sequence, one value
  per gap (so a decode step stalled by a prefill chunk shows in the p99);
- end-to-end latency: from submission to the end of the sequence.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Protocol

from serving.replica.stats import percentile

WINDOW_S = 60.0
MAX_SEQUENCE_SAMPLES = 1000  # queue and TTFT values kept (one per sequence)
MAX_GAP_SAMPLES = 10_000  # inter-token gaps kept (one per token)
LATENCY_KEYS = ("ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99",
                "queue_ms_p50", "queue_ms_p99")


class GenerationObserver(Protocol):
    """What the engine reports (engine thread; durations in seconds, `now_s` its clock)."""

    def admitted(self, queue_s: float, now_s: float) -> None:
        """A sequence entered the running batch after waiting `queue_s`."""

    def prefilled(self, prompt_tokens: int) -> None:
        """A sequence's whole prompt is in its cache."""

    def token(self, since_previous_s: float | None, first_after_s: float | None,
              now_s: float) -> None:
        """A token was sampled: the gap since the sequence's previous one, or (first
        token) the time since submission."""

    def finished(self, reason: str, latency_s: float) -> None:
        """A sequence ended ("stop", "length", "cancelled" or "error")."""


class RecentWindow:
    """Values (milliseconds) of the last `window_s` seconds, at most `max_samples` kept.

    Written from the engine thread and read from the event loop, hence the lock; reads
    sort a copy (at most `max_samples` values: a few milliseconds at worst, once a poll).
    """

    def __init__(self, max_samples: int, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._lock = threading.Lock()

    def add(self, now_s: float, value_ms: float) -> None:
        """Keep one value observed at `now_s` (the oldest falls out when full)."""
        with self._lock:
            self._samples.append((now_s, value_ms))

    def p50_p99(self, now_s: float) -> tuple[float | None, float | None]:
        """Return the nearest-rank p50 and p99 of the window, (None, None) when empty."""
        horizon_s = now_s - self.window_s
        with self._lock:
            while self._samples and self._samples[0][0] < horizon_s:
                self._samples.popleft()
            values = sorted(value for _, value in self._samples)
        if not values:
            return None, None
        return round(percentile(values, 0.5), 3), round(percentile(values, 0.99), 3)


class RecentTimings:
    """The observer behind /stats: p50/p99 of queue, TTFT and ITL over the last minute."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.queue = RecentWindow(MAX_SEQUENCE_SAMPLES, window_s)
        self.ttft = RecentWindow(MAX_SEQUENCE_SAMPLES, window_s)
        self.itl = RecentWindow(MAX_GAP_SAMPLES, window_s)

    def admitted(self, queue_s: float, now_s: float) -> None:
        self.queue.add(now_s, queue_s * 1000.0)

    def prefilled(self, prompt_tokens: int) -> None:
        pass  # counts live in the scheduler's totals

    def token(self, since_previous_s: float | None, first_after_s: float | None,
              now_s: float) -> None:
        if first_after_s is not None:
            self.ttft.add(now_s, first_after_s * 1000.0)
        if since_previous_s is not None:
            self.itl.add(now_s, since_previous_s * 1000.0)

    def finished(self, reason: str, latency_s: float) -> None:
        pass  # end-to-end latency is Prometheus's only (the gateway measures its own)

    def snapshot(self, now_s: float) -> dict[str, Any]:
        """Return the LATENCY_KEYS (milliseconds, None without a sequence in the window)."""
        figures: dict[str, Any] = {}
        for name, window in (("ttft", self.ttft), ("itl", self.itl), ("queue", self.queue)):
            figures[f"{name}_ms_p50"], figures[f"{name}_ms_p99"] = window.p50_p99(now_s)
        return figures
