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
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import generate_latest

from serving.gateway.metrics_snapshot import (
    GAUGE_FRESH_S,
    Collector,
    Family,
    FixedCollector,
    Snapshot,
    decode,
    encode,
    families_of,
    merge,
)

WRITE_EVERY_S = 1.0
MAX_SNAPSHOT_BYTES = 8 * 1024**2
MAX_SNAPSHOT_FILES = 256
MAX_WARNED_NAMES = 1024
log = logging.getLogger("serving.gateway.metrics_share")
# The snapshot format and the sum live in metrics_snapshot.py; importers take them here too.
__all__ = ["GAUGE_FRESH_S", "MAX_SNAPSHOT_BYTES", "MAX_SNAPSHOT_FILES", "SharedMetrics",
           "SnapshotReader", "SnapshotWriter", "decode", "encode", "write_atomically"]


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
        summed = FixedCollector(merge(own, self._reader.read(), now_s))
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
        return families_of(FixedCollector(merge(live, [self._carried], now_s)))

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
