"""The replica's Prometheus metrics (`GET /metrics`, behind the replica's bearer key).

One registry per replica (not prometheus_client's global one, so two apps in one process
never share figures). Every series carries the same labels, fixed at start: `model`,
`version` and `replica` (host:port); the only other label is a finished request's
`finish_reason`, from a closed set. So the number of series never grows with traffic.

Generation replicas (hf_causal_lm) export, as vLLM does:
- histograms (seconds): swarm_replica_time_to_first_token_seconds,
  swarm_replica_inter_token_latency_seconds, swarm_replica_queue_time_seconds,
  swarm_replica_e2e_request_latency_seconds;
- counters: swarm_replica_prompt_tokens_total, swarm_replica_generation_tokens_total,
  swarm_replica_requests_finished_total{finish_reason};
- gauges, read from the engine at scrape time: swarm_replica_sequences_running,
  swarm_replica_sequences_waiting, swarm_replica_kv_cache_usage_ratio (cache tokens in use
  over the cache budget, 0..1).
Every replica also exports swarm_replica_in_flight_requests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LABELS = ("model", "version", "replica")
FINISH_REASONS = ("stop", "length", "cancelled", "error")
# Seconds. Token latencies of a CPU replica run from ~1 ms (tiny models) to seconds.
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                   0.75, 1.0, 2.5, 5.0)
REQUEST_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                     80.0, 160.0, 320.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ReplicaMetrics:
    """The registry of one replica, and the generation observer that feeds it."""

    def __init__(self, model: str, version: str, replica: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._labels = {"model": model, "version": version, "replica": replica}
        self._in_flight = self._gauge("swarm_replica_in_flight_requests",
                                      "Requests being served by the replica now.")

    def render(self) -> bytes:
        """Return the text exposition of every metric."""
        body: bytes = generate_latest(self.registry)
        return body

    def watch_in_flight(self, read: Callable[[], float]) -> None:
        """Read the in-flight count at scrape time."""
        self._in_flight.set_function(read)

    def generation_observer(self, read_snapshot: Callable[[], dict[str, Any]]
                            ) -> GenerationExport:
        """Return the observer to give the engine; gauges read `read_snapshot()`."""
        return GenerationExport(self, read_snapshot)

    def _gauge(self, name: str, documentation: str) -> Any:
        return Gauge(name, documentation, LABELS, registry=self.registry).labels(
            **self._labels)

    def histogram(self, name: str, documentation: str, buckets: tuple[float, ...]) -> Any:
        """Return a labelled histogram child."""
        return Histogram(name, documentation, LABELS, buckets=buckets,
                         registry=self.registry).labels(**self._labels)

    def counter(self, name: str, documentation: str) -> Any:
        """Return a labelled counter child."""
        return Counter(name, documentation, LABELS, registry=self.registry).labels(
            **self._labels)

    def finish_counters(self) -> dict[str, Any]:
        """Return the finished-requests counter's child of each finish reason (all
        created now, so each series shows from the start, at 0)."""
        counter = Counter("swarm_replica_requests_finished", "Generation requests finished, "
                          "by finish reason.", (*LABELS, "finish_reason"),
                          registry=self.registry)
        return {reason: counter.labels(**self._labels, finish_reason=reason)
                for reason in FINISH_REASONS}

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """Add a labelled gauge read at scrape time."""
        self._gauge(name, documentation).set_function(read)


class GenerationExport:
    """A generation_metrics.GenerationObserver that writes into the Prometheus registry."""

    def __init__(self, metrics: ReplicaMetrics,
                 read_snapshot: Callable[[], dict[str, Any]]) -> None:
        self._ttft = metrics.histogram("swarm_replica_time_to_first_token_seconds",
                                       "From submission to the first token.", TOKEN_BUCKETS_S)
        self._itl = metrics.histogram("swarm_replica_inter_token_latency_seconds",
                                      "Between consecutive tokens of a sequence.",
                                      TOKEN_BUCKETS_S)
        self._queue = metrics.histogram("swarm_replica_queue_time_seconds",
                                        "From submission to admission into the batch.",
                                        REQUEST_BUCKETS_S)
        self._latency = metrics.histogram("swarm_replica_e2e_request_latency_seconds",
                                          "From submission to the end of the sequence.",
                                          REQUEST_BUCKETS_S)
        self._prompt_tokens = metrics.counter("swarm_replica_prompt_tokens",
                                              "Prompt tokens prefilled.")
        self._generation_tokens = metrics.counter("swarm_replica_generation_tokens",
                                                  "Tokens generated.")
        self._finished = metrics.finish_counters()
        metrics.gauge("swarm_replica_sequences_running", "Sequences in the running batch.",
                      lambda: float(read_snapshot().get("running", 0)))
        metrics.gauge("swarm_replica_sequences_waiting", "Sequences waiting for a slot.",
                      lambda: float(read_snapshot().get("waiting", 0)))
        metrics.gauge("swarm_replica_kv_cache_usage_ratio",
                      "KV-cache tokens in use over the cache budget (0..1).",
                      lambda: cache_usage(read_snapshot()))

    def admitted(self, queue_s: float, now_s: float) -> None:
        self._queue.observe(queue_s)

    def prefilled(self, prompt_tokens: int) -> None:
        self._prompt_tokens.inc(prompt_tokens)

    def token(self, since_previous_s: float | None, first_after_s: float | None,
              now_s: float) -> None:
        self._generation_tokens.inc()
        if first_after_s is not None:
            self._ttft.observe(first_after_s)
        if since_previous_s is not None:
            self._itl.observe(since_previous_s)

    def finished(self, reason: str, latency_s: float) -> None:
        counter = self._finished.get(reason)
        if counter is not None:
            counter.inc()
        self._latency.observe(latency_s)


def cache_usage(snapshot: dict[str, Any]) -> float:
    """Return the cache tokens in use over the budget (0..1; 0 before the engine runs)."""
    limit = snapshot.get("cache_tokens_limit") or 0
    return min(1.0, snapshot.get("cache_tokens_used", 0) / limit) if limit else 0.0
