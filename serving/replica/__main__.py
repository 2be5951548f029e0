"""`python -m serving.replica` / `swarm-replica`: serve one model version over OIP v2."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence

from serving.replica.config import ConfigError, load_config

EXIT_USAGE = 2
# Set by the worker agent: the replica drains (SIGTERM) when its agent dies, even by SIGKILL,
# so a crashed agent leaves no orphan replica holding a port and a GPU.
AGENT_PID_ENV = "SWARM_AGENT_PID"
PR_SET_PDEATHSIG = 1


def follow_agent() -> None:
    """Ask Linux for SIGTERM when the agent that started us exits; exit if it already has."""
    agent_pid = os.environ.get(AGENT_PID_ENV, "")
    if not agent_pid.isdigit() or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(agent_pid):
        sys.exit("swarm-replica: the worker agent that started this replica is gone")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, then serve until drained; return the exit code."""
    follow_agent()
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"swarm-replica: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # Imported here so that a bad command line fails fast, before torch loads.
    from serving.replica.server import run

    return run(config)


if __name__ == "__main__":
    sys.exit(main())
