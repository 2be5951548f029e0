"""The figures metrics_share.py writes and reads, and their sum (pure: figures in, figures
out). A snapshot is one process's counter, gauge and histogram families as JSON; `decode`
checks every name, label and value, since any process (or anything else) may have written
the file. `merge` sums families sample by sample (see metrics_share.py for which figures
add up and how).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

from prometheus_client.core import Metric

SNAPSHOT_FORMAT = 1
GAUGE_FRESH_S = 5.0
KINDS = frozenset({"counter", "gauge", "histogram"})
LARGEST_GAUGES = frozenset({"swarm_gateway_replica_ejected"})
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

Sample = tuple[str, dict[str, str], float]


class Collector(Protocol):
    """What yields metric families: a CollectorRegistry."""

    def collect(self) -> Iterable[Metric]: ...


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family's samples: (sample name, labels, value)."""

    name: str
    kind: str
    help: str
    samples: tuple[Sample, ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One process's figures as written at `written_s` (wall clock, seconds)."""

    instance: str
    written_s: float
    families: tuple[Family, ...]


def families_of(collector: Collector) -> tuple[Family, ...]:
    """Return the counter, gauge and histogram families a registry yields now."""
    return tuple(Family(metric.name, metric.type, metric.documentation,
                        tuple((s.name, dict(s.labels), float(s.value)) for s in metric.samples))
                 for metric in collector.collect() if metric.type in KINDS)


def encode(snapshot: Snapshot) -> bytes:
    """Return the snapshot as the JSON a file holds."""
    return json.dumps({
        "format": SNAPSHOT_FORMAT, "instance": snapshot.instance,
        "written_s": snapshot.written_s,
        "families": [{"name": f.name, "type": f.kind, "help": f.help,
                      "samples": [list(sample) for sample in f.samples]}
                     for f in snapshot.families]}, separators=(",", ":")).encode()


def decode(data: bytes) -> Snapshot:
    """Return the snapshot in `data`; ValueError when it is not one."""
    try:
        raw = json.loads(data)
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc
    if not isinstance(raw, dict) or raw.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"not a metrics snapshot of format {SNAPSHOT_FORMAT}")
    instance, written_s, families = raw.get("instance"), raw.get("written_s"), \
        raw.get("families")
    if not isinstance(instance, str) or not _is_number(written_s) \
            or not isinstance(families, list):
        raise ValueError("instance, written_s or families missing or wrong")
    return Snapshot(instance, float(written_s), tuple(_family(f) for f in families))


def _family(raw: Any) -> Family:
    if not isinstance(raw, dict):
        raise ValueError("a family is not an object")
    name, kind, help_, samples = (raw.get(k) for k in ("name", "type", "help", "samples"))
    if not (isinstance(name, str) and _METRIC_NAME.fullmatch(name) and kind in KINDS
            and isinstance(help_, str) and isinstance(samples, list)):
        raise ValueError("a family's name, type, help or samples are wrong")
    return Family(name, kind, help_, tuple(_sample(name, s) for s in samples))


def _sample(family: str, raw: Any) -> Sample:
    if not (isinstance(raw, list) and len(raw) == 3):
        raise ValueError(f"a sample of {family} is not [name, labels, value]")
    name, labels, value = raw
    if not (isinstance(name, str) and name.startswith(family) and _METRIC_NAME.fullmatch(name)
            and isinstance(labels, dict) and _is_number(value)
            and all(isinstance(k, str) and _LABEL_NAME.fullmatch(k) and isinstance(v, str)
                    for k, v in labels.items())):
        raise ValueError(f"a sample of {family} is wrong")
    return name, labels, float(value)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value)


def merge(own: Iterable[Family], others: Iterable[Snapshot], now_s: float) -> list[Metric]:
    """Return `own` (this process, live) plus `others`, summed per sample; gauges only from
    snapshots written within GAUGE_FRESH_S of `now_s`."""
    total = _Total()
    total.add(own, gauges=True)
    for snapshot in others:
        total.add(snapshot.families, gauges=now_s - snapshot.written_s <= GAUGE_FRESH_S)
    return total.metrics()


class _Total:
    """Families summed sample by sample, in the order first seen (a histogram's buckets
    stay together)."""

    def __init__(self) -> None:
        self._heads: dict[str, tuple[str, str]] = {}  # family -> (type, help)
        self._values: dict[str, dict[tuple[str, frozenset[tuple[str, str]]],
                                     tuple[dict[str, str], float]]] = {}

    def add(self, families: Iterable[Family], gauges: bool) -> None:
        for family in families:
            kind, _help = self._heads.setdefault(family.name, (family.kind, family.help))
            if kind != family.kind or (kind == "gauge" and not gauges):
                continue  # a family that changed type keeps the first one seen
            values = self._values.setdefault(family.name, {})
            for name, labels, value in family.samples:
                key = (name, frozenset(labels.items()))
                before = values.get(key)
                values[key] = (labels, value) if before is None else \
                    (before[0], _combine(family.name, name, before[1], value))

    def metrics(self) -> list[Metric]:
        metrics = []
        for family, (kind, help_) in self._heads.items():
            metric = Metric(family, help_, kind)
            for (name, _key), (labels, value) in self._values.get(family, {}).items():
                metric.add_sample(name, labels, value)
            metrics.append(metric)
        return metrics


def _combine(family: str, sample: str, before: float, value: float) -> float:
    if sample.endswith("_created"):
        return min(before, value)  # when the summed counter first existed anywhere
    if family in LARGEST_GAUGES:
        return max(before, value)
    return before + value


class FixedCollector:
    """A collector of ready-made families (what generate_latest takes)."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)
