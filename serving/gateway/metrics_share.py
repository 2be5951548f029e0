"""One /metrics for several gateway processes on one port: the sum over a shared directory.

A scrape lands on one process, so with only its own figures a counter jumps between the
processes' values from scrape to scrape (Prometheus' rate() sees resets) and the others'
traffic is missing from every answer. With `swarm-gateway --metrics-dir DIR` each process
writes its figures to `DIR/<instance id>.json` (tmp + rename, mode 0600) about once a
second, at shutdown and at each scrape it answers, and a scrape on any process renders its
own live figures plus every other process's last snapshot (so the others' figures lag by up
to a second, and no counter goes back from one scrape to the next, whichever answers):

- counters and histograms add up, those of a process that has stopped included (its file
  stays: the figures are cumulative). A process restarted under the same instance id (as
  make run's supervisor does) counts on from its file, so the sum does not drop: had it
  started from zero, Prometheus would take the drop for a reset of the sum and rate() would
  count everything again. Live processes need distinct instance ids; a new id per start
  (the default, host:pid) starts from zero and leaves one more file each time (at most
  MAX_SNAPSHOT_FILES are read; make run empties the directory when it starts);
- gauges (in flight, queued) add up too, but only from snapshots written in the last
  GAUGE_FRESH_S, so a dead process's requests in flight do not stick; the replica-ejected
  flag takes the largest value (1 while any process ejects the replica);
- a file over MAX_SNAPSHOT_BYTES, or one that is not a snapshot, is skipped with one warning.

The request path is untouched: the figures are copied once a second (GatewayMetrics.frozen,
on the event loop; JSON and file in a thread) and read from the registry at scrape time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeGuard

from prometheus_client import generate_latest
from prometheus_client.core import Metric

SNAPSHOT_FORMAT = 1
WRITE_EVERY_S = 1.0
GAUGE_FRESH_S = 5.0
MAX_SNAPSHOT_BYTES = 8 * 1024**2
MAX_SNAPSHOT_FILES = 256
MAX_WARNED_NAMES = 1024
KINDS = frozenset({"counter", "gauge", "histogram"})
LARGEST_GAUGES = frozenset({"swarm_gateway_replica_ejected"})
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
log = logging.getLogger("serving.gateway.metrics_share")

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


# -- pure: figures in, figures out ---------------------------------------------------------

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


class _Fixed:
    """A collector of ready-made families (what generate_latest takes)."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)


# -- files ---------------------------------------------------------------------------------

def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` at once (mode 0600); readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class SnapshotReader:
    """Reads the snapshots in a directory but one (a file parsed again only once it changed);
    each file skipped is warned of once."""

    def __init__(self, directory: Path, skip_name: str) -> None:
        self.directory = directory
        self.skip_name = skip_name
        self._parsed: dict[str, tuple[tuple[int, int, int], Snapshot | None]] = {}
        self._warned: set[str] = set()

    def read(self) -> list[Snapshot]:
        """Return every readable snapshot (the first MAX_SNAPSHOT_FILES by name)."""
        try:
            names = sorted(name for name in os.listdir(self.directory)
                           if name.endswith(".json") and not name.startswith(".")
                           and name != self.skip_name)
        except OSError as exc:
            self._warn_once("", f"cannot list the metrics directory: {exc}")
            return []
        if len(names) > MAX_SNAPSHOT_FILES:
            self._warn_once("*", f"{len(names)} snapshots in {self.directory}: summing the "
                                 f"first {MAX_SNAPSHOT_FILES} (remove old ones)")
        parsed: dict[str, tuple[tuple[int, int, int], Snapshot | None]] = {}
        for name in names[:MAX_SNAPSHOT_FILES]:
            self._read_one(name, parsed)
        self._parsed = parsed  # files gone are forgotten
        return [snapshot for _stamp, snapshot in parsed.values() if snapshot is not None]

    def _read_one(self, name: str, parsed: dict[str, tuple[tuple[int, int, int],
                                                           Snapshot | None]]) -> None:
        path = self.directory / name
        try:
            with path.open("rb") as file:
                stat = os.fstat(file.fileno())
                stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
                known = self._parsed.get(name)
                if known is not None and known[0] == stamp:
                    parsed[name] = known
                    return
                parsed[name] = (stamp, None)  # until it proves good
                if stat.st_size > MAX_SNAPSHOT_BYTES:
                    raise ValueError(f"over {MAX_SNAPSHOT_BYTES} bytes")
                data = file.read(MAX_SNAPSHOT_BYTES + 1)
            if len(data) > MAX_SNAPSHOT_BYTES:
                raise ValueError(f"over {MAX_SNAPSHOT_BYTES} bytes")
            parsed[name] = (stamp, decode(data))
            self._warned.discard(name)
        except FileNotFoundError:
            return  # replaced or removed since the listing
        except (OSError, ValueError) as exc:
            self._warn_once(name, f"skipping metrics snapshot {path}: {exc}")

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        if len(self._warned) >= MAX_WARNED_NAMES:
            self._warned.clear()
        self._warned.add(key)
        log.warning("%s", message)


# -- one process's side --------------------------------------------------------------------

class SharedMetrics:
    """This process's snapshot file in `directory`, and the sum a scrape renders."""

    def __init__(self, directory: Path, instance: str,
                 clock_s: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.instance = instance
        self.path = directory / f"{instance}.json"
        self._clock_s = clock_s
        self._reader = SnapshotReader(directory, self.path.name)
        self._carried = self._previous_counts()
        self._lock = threading.Lock()  # the periodic write runs in a thread
        self._taken = 0  # snapshots taken (on the event loop)
        self._written = 0  # the latest one in the file
        self._failing = False

    def render(self, live: Collector) -> bytes:
        """Return the Prometheus text of `live` plus every other process's snapshot.

        Our own file is brought up to date first: a later scrape answered by another
        process then counts at least what this one did, so no counter goes back between
        scrapes (Prometheus would take that for a reset)."""
        taken, now_s = self.stamp()
        own = self._own(live, now_s)
        self.write(taken, encode(Snapshot(self.instance, now_s, own)))
        summed = _Fixed(merge(own, self._reader.read(), now_s))
        return generate_latest(summed)

    def _previous_counts(self) -> Snapshot | None:
        """Return the counters and histograms our file kept from a previous process under
        our instance id (we count on from them), else None."""
        try:
            if self.path.stat().st_size > MAX_SNAPSHOT_BYTES:
                raise ValueError(f"over {MAX_SNAPSHOT_BYTES} bytes")
            before = decode(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("starting the metrics of %s from zero: %s", self.path, exc)
            return None
        counts = tuple(f for f in before.families if f.kind != "gauge")
        return Snapshot(before.instance, before.written_s, counts)

    def _own(self, figures: Collector, now_s: float) -> tuple[Family, ...]:
        """Return our figures: `figures` plus what a previous process here counted."""
        live = families_of(figures)
        if self._carried is None:
            return live
        return families_of(_Fixed(merge(live, [self._carried], now_s)))

    def stamp(self) -> tuple[int, float]:
        """Return the next snapshot's number and time (taken where the figures are)."""
        self._taken += 1
        return self._taken, self._clock_s()

    def encode(self, figures: Collector, written_s: float) -> bytes:
        """Return `figures` as the bytes our file gets."""
        return encode(Snapshot(self.instance, written_s, self._own(figures, written_s)))

    def snapshot(self, live: Collector) -> tuple[int, bytes]:
        """Return this process's figures now as the bytes its file gets, and their number."""
        taken, now_s = self.stamp()
        return taken, self.encode(live, now_s)

    def write(self, taken: int, data: bytes) -> bool:
        """Replace our file with snapshot number `taken` unless a later one is there already;
        return False when the disk refused (logged once until a write succeeds)."""
        with self._lock:
            if taken <= self._written:
                return True
            try:
                write_atomically(self.path, data)
            except OSError as exc:
                if not self._failing:
                    log.warning("cannot write the metrics snapshot %s: %s", self.path, exc)
                self._failing = True
                return False
            self._written, self._failing = taken, False
            return True


class SnapshotWriter:
    """Writes a process's snapshot every `every_s` from a task, and once more at `aclose`.

    `freeze` returns the figures as they are (GatewayMetrics.frozen: a cheap copy, on the
    event loop, their only writer); they become JSON and a file in a thread."""

    def __init__(self, shared: SharedMetrics, freeze: Callable[[], Collector],
                 every_s: float = WRITE_EVERY_S) -> None:
        self.shared = shared
        self._freeze = freeze
        self._every_s = every_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start writing, from a task on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self.write_now()
            await asyncio.sleep(self._every_s)

    async def write_now(self) -> None:
        """Write the snapshot (encoded and written in a thread: the loop keeps serving)."""
        figures = self._freeze()
        taken, now_s = self.shared.stamp()
        await asyncio.to_thread(self._write, taken, figures, now_s)

    def _write(self, taken: int, figures: Collector, written_s: float) -> None:
        self.shared.write(taken, self.shared.encode(figures, written_s))

    async def aclose(self) -> None:
        """Stop the task and write the final figures."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.write_now()
