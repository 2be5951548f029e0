"""The gateway's Prometheus metrics: one registry per app, cheap to count per request.

Counters follow Triton's names where one exists (`nv_inference_request_success`, ...;
prometheus-client exposes counters with the OpenMetrics `_total` suffix). The counts are
per request at the gateway: it forwards bodies as bytes, so `nv_inference_count` counts
requests, not rows. The per-request figures are plain integers on a per-(deployment,
version) object, turned into metric families only when scraped: the event loop is the
only writer, so they need none of prometheus-client's per-increment locking. Gauges (in
flight, queue depth) are read from the balancers at scrape time too.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0, 30.0)
# Time to the first token of a stream: queueing and prefill at the replica, seconds.
FIRST_TOKEN_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class LiveReplica:
    """A replica's figures at scrape time."""

    replica_id: int
    address: str
    version: int
    in_flight: int
    ejected: bool


@dataclass(frozen=True, slots=True)
class LiveDeployment:
    """A deployment's figures at scrape time."""

    model: str
    queued: int
    replicas: tuple[LiveReplica, ...]


class VersionMetrics:
    """The request counts of one (deployment, version), kept once and reused per request."""

    __slots__ = ("buckets", "duration_sum_s", "failure", "labels", "success")

    def __init__(self, model: str, version: str) -> None:
        self.labels = [model, version]
        self.success = 0
        self.failure = 0
        self.duration_sum_s = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)  # the last one is +Inf

    def observe(self, status: int, duration_s: float) -> None:
        """Count one finished inference request."""
        if status == 200:
            self.success += 1
        else:
            self.failure += 1
        self.duration_sum_s += duration_s
        self.buckets[bisect_left(LATENCY_BUCKETS_S, duration_s)] += 1

    def copy(self) -> VersionMetrics:
        """Return a copy of the counts as they are now."""
        twin = VersionMetrics.__new__(VersionMetrics)
        twin.labels, twin.success, twin.failure = self.labels, self.success, self.failure
        twin.duration_sum_s, twin.buckets = self.duration_sum_s, self.buckets[:]
        return twin

    def cumulative_buckets(self) -> list[tuple[str, float]]:
        """Return the histogram buckets as Prometheus wants them: cumulative, with +Inf."""
        total = 0
        pairs = []
        for bound, count in zip([*map(str, LATENCY_BUCKETS_S), "+Inf"], self.buckets,
                                strict=True):
            total += count
            pairs.append((bound, float(total)))
        return pairs


class NullVersionMetrics:
    """Stands in for VersionMetrics when metrics are off."""

    __slots__ = ()

    def observe(self, status: int, duration_s: float) -> None:
        """Count nothing."""


class _RequestCollector:
    """Yields the per-version request counters and latency histogram at scrape time."""

    def __init__(self, versions: Callable[[], Iterable[VersionMetrics]]) -> None:
        self._versions = versions

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        per_version = ["model", "version"]
        success = CounterMetricFamily("nv_inference_request_success",
                                      "Successful inference requests", labels=per_version)
        failure = CounterMetricFamily("nv_inference_request_failure",
                                      "Failed inference requests", labels=per_version)
        count = CounterMetricFamily("nv_inference_count", "Inferences performed (requests: "
                                    "the gateway does not parse bodies)", labels=per_version)
        duration = HistogramMetricFamily("nv_inference_request_duration_seconds",
                                         "Inference request time at the gateway",
                                         labels=per_version)
        for version in list(self._versions()):
            success.add_metric(version.labels, version.success)
            failure.add_metric(version.labels, version.failure)
            count.add_metric(version.labels, version.success)
            duration.add_metric(version.labels, version.cumulative_buckets(),
                                version.duration_sum_s)
        yield from (success, failure, count, duration)


class _LiveCollector:
    """Yields the in-flight and queue gauges from the balancers at scrape time."""

    def __init__(self, live: Callable[[], Iterable[LiveDeployment]]) -> None:
        self._live = live

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily("swarm_gateway_in_flight",
                                      "Requests the gateway has in flight", labels=["model"])
        queued = GaugeMetricFamily("swarm_gateway_queue_depth",
                                   "Requests waiting for a replica at the gateway",
                                   labels=["model"])
        replica_in_flight = GaugeMetricFamily(
            "swarm_gateway_replica_in_flight", "Requests in flight per replica",
            labels=["model", "version", "replica"])
        ejected = GaugeMetricFamily("swarm_gateway_replica_ejected",
                                    "1 while the replica is ejected after failures",
                                    labels=["model", "version", "replica"])
        for deployment in self._live():
            in_flight.add_metric([deployment.model],
                                 sum(r.in_flight for r in deployment.replicas))
            queued.add_metric([deployment.model], deployment.queued)
            for replica in deployment.replicas:
                labels = [deployment.model, str(replica.version), str(replica.replica_id)]
                replica_in_flight.add_metric(labels, replica.in_flight)
                ejected.add_metric(labels, int(replica.ejected))
        yield from (in_flight, queued, replica_in_flight, ejected)


class FrozenMetrics:
    """Every figure at one moment, collected as the registry would be: the request counts
    are copied (cheap on the event loop) and turned into families only when collected,
    which may be on another thread."""

    def __init__(self, versions: list[VersionMetrics], others: list[Metric]) -> None:
        self._versions = versions
        self._others = others

    def collect(self) -> Iterator[Metric]:
        yield from _RequestCollector(lambda: self._versions).collect()
        yield from self._others


class GatewayMetrics:
    """Every gateway metric, in a registry of its own (tests may build several apps)."""

    def __init__(self, enabled: bool, live: Callable[[], Iterable[LiveDeployment]]) -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry()
        # What render() writes the registry with: swarm-gateway --metrics-dir swaps in the
        # sum over its sibling processes (metrics_share.SharedMetrics.render).
        self.renderer: Callable[[CollectorRegistry], bytes] = generate_latest
        self._versions: dict[tuple[str, int], VersionMetrics | NullVersionMetrics] = {}
        self.registry.register(_RequestCollector(self._counted_versions))
        self.retries = Counter("swarm_gateway_retries", "Attempts retried on another replica",
                               ["model"], registry=self.registry)
        self.ejections = Counter("swarm_gateway_ejections", "Replicas ejected after failures",
                                 ["model"], registry=self.registry)
        self.rejections = Counter("swarm_gateway_rejections",
                                  "Requests refused by the gateway itself",
                                  ["model", "code"], registry=self.registry)
        self.cancellations = Counter("swarm_gateway_cancelled",
                                     "Requests whose client went away first", ["model"],
                                     registry=self.registry)
        # Streams are seconds long and few: prometheus-client's locking costs nothing here.
        self.first_tokens = Histogram(
            "swarm_gateway_time_to_first_token_seconds",
            "Time from a stream's request to its first body byte sent, at the gateway",
            ["model"], buckets=FIRST_TOKEN_BUCKETS_S, registry=self.registry)
        self.streams = Gauge("swarm_gateway_streams_in_flight",
                             "Streamed answers (generate_stream) being relayed", ["model"],
                             registry=self.registry)
        self._live = _LiveCollector(live)
        self.registry.register(self._live)

    def _counted_versions(self) -> Iterator[VersionMetrics]:
        for bound in list(self._versions.values()):
            if isinstance(bound, VersionMetrics):
                yield bound

    def for_version(self, model: str, version: int) -> VersionMetrics | NullVersionMetrics:
        """Return the bound counters of one deployment version."""
        bound = self._versions.get((model, version))
        if bound is None:
            bound = VersionMetrics(model, str(version)) if self.enabled \
                else NullVersionMetrics()
            self._versions[(model, version)] = bound
        return bound

    def frozen(self) -> FrozenMetrics:
        """Return the figures as they are now, the registry's families in its order (for a
        snapshot written off the event loop)."""
        others = [metric for collector in (self.retries, self.ejections, self.rejections,
                                           self.cancellations, self.first_tokens,
                                           self.streams, self._live)
                  for metric in collector.collect()]
        return FrozenMetrics([bound.copy() for bound in self._counted_versions()], others)

    def version_count(self) -> int:
        """Return how many (deployment, version) counters exist."""
        return len(self._versions)

    def rejected(self, model: str, status: int) -> None:
        """Count a request the gateway answered itself with an error status."""
        if self.enabled:
            self.rejections.labels(model, str(status)).inc()

    def retried(self, model: str) -> None:
        """Count an attempt retried on another replica."""
        if self.enabled:
            self.retries.labels(model).inc()

    def ejected(self, model: str) -> None:
        """Count a replica ejection."""
        if self.enabled:
            self.ejections.labels(model).inc()

    def cancelled(self, model: str) -> None:
        """Count a request abandoned by its client."""
        if self.enabled:
            self.cancellations.labels(model).inc()

    def stream_started(self, model: str) -> None:
        """Count a stream in flight (its head went to the client)."""
        if self.enabled:
            self.streams.labels(model).inc()

    def stream_ended(self, model: str) -> None:
        """Count a stream no longer in flight."""
        if self.enabled:
            self.streams.labels(model).dec()

    def first_token(self, model: str, duration_s: float) -> None:
        """Record a stream's time from its request's start to its first body byte."""
        if self.enabled:
            self.first_tokens.labels(model).observe(duration_s)

    def render(self) -> bytes:
        """Return the Prometheus text exposition."""
        return self.renderer(self.registry)
