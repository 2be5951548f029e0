"""What the agent's replica manager (replicas.py) keeps per replica and how this node runs
replicas: the settings, one record per replica, and the small helpers that change a
record's state. No process is started or probed here.
"""

from __future__ import annotations

import sys
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.agent import processes, replica_stats, survivors
from serving.agent.logs import LogTail
from swarm_protocol.agent_messages import DesiredReplica, ReplicaStatus

REPLICA_FORMATS = ("torchscript", "torch_export", "onnx", "hf_causal_lm")
READY_PATH = "/v2/health/ready"
STATS_PATH = "/stats"
LIVE_STATES = ("starting", "ready", "draining")
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")  # noqa: S104 - names, compared against
ALIVE_FILE = "agent.alive"
MAX_PORT_CLASHES = 3  # relaunches on another port when a port was taken under us


@dataclass(frozen=True)
class ReplicaSettings:
    """How this node runs replicas."""

    replicas_dir: Path
    port_range: range
    bind_host: str = "127.0.0.1"
    ready_timeout_s: float = 300.0
    drain_grace_s: float = 30.0
    # A ready replica is reported "draining" this long before it gets SIGTERM and starts
    # refusing requests, so every gateway has reloaded its table and sends it nothing new
    # (the preStop pause of Kubernetes, for the same race). Counts within drain_grace_s.
    drain_delay_s: float = 2.0
    http_timeout_s: float = 1.0
    replica_module: str = processes.REPLICA_MODULE
    python: str = sys.executable
    # A replica drains itself when no agent has touched its alive file for this long.
    watchdog_s: float = processes.DEFAULT_WATCHDOG_S

    @property
    def connect_host(self) -> str:
        """Return the host the agent itself uses to reach its replicas."""
        return "127.0.0.1" if self.bind_host in _WILDCARD_HOSTS else self.bind_host


@dataclass
class ManagedReplica:
    """One replica as the agent tracks it."""

    desired: DesiredReplica
    replica_key: str
    artifact: Future[Path] | None = None
    state: str = "starting"
    error: str = ""
    port: int | None = None
    process: processes.ReplicaProcess | None = None
    launched_at_s: float | None = None
    drain_started_at_s: float | None = None
    signalled: bool = False  # SIGTERM sent (after the drain delay)
    stats: dict[str, Any] = field(default_factory=dict)
    # Its cumulative counters at the previous /stats: rates are differences between polls.
    counters: replica_stats.Counters = field(default_factory=replica_stats.Counters)
    # Adopted from a previous agent run and not yet confirmed by a heartbeat reply: the
    # first reconcile drains it unless the portal still wants exactly it, under this key.
    unconfirmed: bool = False
    logs: LogTail | None = None  # from its launch (or adoption) on
    started_at_s: float | None = None  # wall clock, epoch s: the portal shows uptime
    restarts: int = 0  # launches under this id after the first
    # Launches again on another port because a process took its port between our probe
    # and its bind (the probe cannot reserve it); bounded by MAX_PORT_CLASHES.
    port_clashes: int = 0

    @property
    def replica_id(self) -> int:
        return self.desired.replica_id

    def status(self) -> ReplicaStatus:
        """Return what the next heartbeat says about this replica."""
        lines = list(self.logs.pending) if self.logs is not None else []
        return ReplicaStatus(replica_id=self.replica_id, state=self.state, port=self.port,
                             error=self.error, started_at_s=self.started_at_s,
                             restarts=self.restarts, log_lines=lines, **self.stats)


def alive(process: processes.ReplicaProcess | None) -> bool:
    """Return whether a replica's process runs (None: never launched)."""
    return process is not None and process.poll() is None


def fail(replica: ManagedReplica, reason: str) -> None:
    """Mark a replica failed with `reason`; its last figures no longer hold."""
    replica.state = "failed"
    replica.error = reason
    replica.stats = {}


def written_at_s(replica_dir: Path) -> float | None:
    """Return when the launch record was written (epoch s): an adopted replica's start."""
    try:
        return (replica_dir / survivors.RECORD_FILE).stat().st_mtime
    except OSError:
        return None


def with_stderr(reason: str, replica_dir: Path) -> str:
    """Return `reason` with the replica's last stderr line, where it wrote one."""
    line = processes.last_stderr_line(replica_dir)
    return f"{reason}: {line}" if line else reason
