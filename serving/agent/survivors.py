"""Replicas that outlive their agent: the record each one leaves, and finding them again.

A replica server keeps running when its agent dies (kill -9, OOM, an upgrade), so that a
restarted agent can adopt it instead of cold-starting a new one. The agent writes a small
JSON record into each replica directory when it launches the process; the next agent run
reads those records and keeps only the processes it can prove are still that very replica:
same pid, same start time in /proc (a reused pid has another), and a command line that runs
the replica module from that directory on that port.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import select
import subprocess
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from swarm_protocol.agent_messages import DesiredReplica, ProtocolError
from swarm_protocol.private_files import write_private

log = logging.getLogger(__name__)
RECORD_FILE = "replica.json"
SIGNATURE_FILE = "signature.json"  # also in the command line: part of its identity
LEGACY_PID_FILE = "pid"  # written by agents before adoption; nothing reads it now
EXIT_CODE_UNKNOWN = -1  # an adopted process is not our child: its exit status is not ours


@dataclass(frozen=True)
class ReplicaRecord:
    """What a restarted agent needs to recognise and adopt a running replica."""

    replica_id: int
    pid: int
    start_ticks: int  # /proc/<pid>/stat field 22: tells a reused pid apart
    port: int
    key_sha256: str  # a hash only: the key itself stays out of files
    desired: dict[str, Any]  # the DesiredReplica it runs (model, version, sha256, ...)

    def desired_replica(self) -> DesiredReplica:
        """Return the DesiredReplica this process was started for."""
        return DesiredReplica.from_dict(self.desired)


def key_sha256(replica_key: str) -> str:
    """Return the hex SHA-256 of a replica key (what records keep instead of the key)."""
    return hashlib.sha256(replica_key.encode()).hexdigest()


def write_record(replica_dir: Path, record: ReplicaRecord) -> None:
    """Write the record atomically: a reader sees the old file or the new one, never half."""
    write_private(replica_dir / RECORD_FILE, json.dumps(asdict(record)).encode())


def read_record(replica_dir: Path) -> ReplicaRecord | None:
    """Return the record in `replica_dir`, or None when missing or malformed."""
    try:
        raw = json.loads((replica_dir / RECORD_FILE).read_text())
        record = ReplicaRecord(**raw)
        record.desired_replica()  # a record we could not adopt from is no record
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, ProtocolError) as error:
        log.warning("ignoring unreadable replica record in %s: %s", replica_dir, error)
        return None
    if not all(isinstance(v, int) for v in (record.replica_id, record.pid, record.start_ticks,
                                            record.port)):
        return None
    return record


def start_ticks(pid: int) -> int | None:
    """Return when `pid` started (clock ticks since boot), or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def runs_replica(pid: int, replica_dir: Path, module: str, port: int) -> bool:
    """Return whether `pid`'s command line runs `module` from `replica_dir` on `port`."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    signature = str(replica_dir / SIGNATURE_FILE).encode()
    port_arg = [b"--port", str(port).encode()]
    has_port = any(argv[i:i + 2] == port_arg for i in range(len(argv) - 1))
    return module.encode() in argv and signature in argv and has_port


class AdoptedProcess:
    """A replica process started by an earlier agent run, watched through a pidfd.

    Not our child, so no wait(): the pidfd says when it exits, and it stays bound to this
    very process even if the pid is reused later.
    """

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd: int | None = pidfd

    @classmethod
    def open(cls, record: ReplicaRecord) -> AdoptedProcess | None:
        """Return a handle on the recorded process, or None if it is no longer that one."""
        try:
            pidfd = os.pidfd_open(record.pid)
        except OSError:
            return None
        # Checked after the pidfd is open: the fd and the start time name the same process.
        if start_ticks(record.pid) != record.start_ticks:
            os.close(pidfd)
            return None
        return cls(record.pid, pidfd)

    def poll(self) -> int | None:
        """Return EXIT_CODE_UNKNOWN once the process has exited, else None."""
        return self.wait(0.0, raise_on_timeout=False)

    def wait(self, timeout: float | None = None, raise_on_timeout: bool = True) -> int | None:
        """Wait for the exit (at most `timeout` s); return EXIT_CODE_UNKNOWN when it did."""
        if self._pidfd is None:
            return self.returncode
        readable, _, _ = select.select([self._pidfd], [], [], timeout)
        if not readable:
            if raise_on_timeout:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
            return None
        self.close()
        self.returncode = EXIT_CODE_UNKNOWN
        return self.returncode

    def close(self) -> None:
        """Release the pidfd (the process itself is left alone)."""
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


@dataclass(frozen=True)
class Survivor:
    """A replica process a previous agent run left running, proven to be that replica."""

    record: ReplicaRecord
    process: AdoptedProcess


def find_survivors(replicas_dir: Path, module: str) -> list[Survivor]:
    """Return the replicas still running from a previous run; drop records of the others."""
    survivors = []
    for replica_dir in sorted(path for path in replicas_dir.iterdir() if path.is_dir()):
        (replica_dir / LEGACY_PID_FILE).unlink(missing_ok=True)
        record = read_record(replica_dir)
        if record is None:
            continue
        process = _open_if_replica(record, replica_dir, module)
        if process is None:
            log.info("replica %d (pid %d) from a previous run is gone", record.replica_id,
                     record.pid)
            (replica_dir / RECORD_FILE).unlink(missing_ok=True)
            continue
        survivors.append(Survivor(record, process))
    return survivors


def _open_if_replica(record: ReplicaRecord, replica_dir: Path,
                     module: str) -> AdoptedProcess | None:
    process = AdoptedProcess.open(record)
    if process is None:
        return None
    if not runs_replica(record.pid, replica_dir, module, record.port) \
            or replica_dir.name != str(record.replica_id):
        process.close()
        return None
    return process


class AliveFile:
    """The file whose modification time tells replicas that an agent still looks after them.

    Each replica's watchdog drains it when the file has not changed for its watchdog period:
    a killed agent that never comes back leaves nothing running for long. Bumped from its
    own thread, so a heartbeat stuck on a slow portal never starves it.
    """

    def __init__(self, path: Path, every_s: float = 1.0) -> None:
        self.path = path
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="alive-file", daemon=True)

    def start(self) -> None:
        """Touch the file now, then every `every_s` seconds until stop()."""
        self.touch()
        self._thread.start()

    def stop(self) -> None:
        """Stop touching the file (the replicas drain themselves a watchdog period later)."""
        self._stop.set()

    def touch(self) -> None:
        """Bump the file's modification time."""
        try:
            self.path.touch()
        except OSError as error:
            log.warning("could not touch %s (replicas may drain themselves): %s", self.path,
                        error)

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            self.touch()
