"""What the agent is told on its command line, and how it stops: its exit codes and the
exception that carries one out of the loop (cli.py turns it into the process's status).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from serving.agent.processes import DEFAULT_WATCHDOG_S, REPLICA_MODULE

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REVOKED = 3
EXIT_PORTAL_LOST = 4
JOIN_HINT = "give the join token in SWARM_JOIN_TOKEN or --token-file PATH"


class AgentExit(Exception):
    """The agent must stop with this exit code."""

    def __init__(self, exit_code: int, message: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class AgentConfig:
    """What the agent was told on its command line."""

    portal_url: str
    cache_dir: Path
    name: str
    join_token: str | None = None
    address: str = "127.0.0.1"
    bind_host: str = "127.0.0.1"
    port_range: range = range(9100, 9200)
    cost_per_hour: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)
    heartbeat_interval_s: float | None = None  # None: follow the portal (1 s until it says)
    drain_grace_s: float = 30.0
    drain_delay_s: float = 2.0
    ready_timeout_s: float = 300.0
    http_timeout_s: float = 10.0
    replica_module: str = REPLICA_MODULE  # the replica server to run (`python -m` name)
    replica_watchdog_s: float = DEFAULT_WATCHDOG_S  # replicas drain after this long alone
    tunnel: bool = False  # serve through gateway tunnels, whatever the portal's probe says
    # 0: never. Otherwise drain and exit once no heartbeat got through for this long: for
    # workers a portal starts for itself (the local provider), which must not outlive it.
    portal_lost_exit_s: float = 0.0
    # Replicas serve TLS with a certificate the portal signs at join (direct mode). The CLI
    # turns it on for every address but loopback ones (swarm-worker --tls).
    tls: bool = False
