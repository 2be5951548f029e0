"""`python -m serving.replica` / `swarm-replica`: serve one model version over OIP v2."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from serving.replica.config import ConfigError, load_config

EXIT_USAGE = 2
# Set by the worker agent. A replica does not die with its agent (a restarted agent adopts
# it: no cold start, no failed requests); instead the agent bumps this file's time while it
# runs, and a replica that sees no bump for the watchdog period drains itself, so a killed
# agent that never comes back leaves nothing running for long.
ALIVE_FILE_ENV = "SWARM_AGENT_ALIVE_FILE"
WATCHDOG_ENV = "SWARM_AGENT_WATCHDOG_S"
AGENT_PID_ENV = "SWARM_AGENT_PID"  # only for the log line
log = logging.getLogger("serving.replica")


class AgentWatchdog:
    """Drains this process (SIGTERM) when the agent's alive file stops changing.

    Changes are timed on the monotonic clock, not by comparing the file's time with now,
    so a wall-clock step neither kills a looked-after replica nor keeps an orphan alive.
    A second SIGTERM (stop at once) follows one more period later if the drain hangs.
    """

    def __init__(self, alive_file: Path, period_s: float) -> None:
        self.alive_file = alive_file
        self.period_s = period_s
        self._seen_mtime_ns: int | None = self._mtime_ns()
        self._changed_at_s = time.monotonic()
        self.signals_sent = 0

    def check(self, now_s: float) -> bool:
        """Signal when due; return whether this call sent a signal."""
        mtime_ns = self._mtime_ns()
        if mtime_ns is not None and mtime_ns != self._seen_mtime_ns:
            self._seen_mtime_ns, self._changed_at_s = mtime_ns, now_s
            self.signals_sent = 0  # an agent came back before the drain ended
            return False
        if now_s - self._changed_at_s < self.period_s * (self.signals_sent + 1) \
                or self.signals_sent >= 2:
            return False
        log.warning("no worker agent for %gs (alive file %s): draining", self.period_s,
                    self.alive_file)
        self.signals_sent += 1
        os.kill(os.getpid(), signal.SIGTERM)
        return True

    def run_forever(self) -> None:
        """Check a few times per period, for the life of the process."""
        interval_s = min(1.0, self.period_s / 4)
        while True:
            time.sleep(interval_s)  # a daemon thread's pace, not a wait for a condition
            self.check(time.monotonic())

    def _mtime_ns(self) -> int | None:
        try:
            return self.alive_file.stat().st_mtime_ns
        except OSError:
            return None


def start_watchdog(environ: Mapping[str, str]) -> AgentWatchdog | None:
    """Start the agent watchdog in a daemon thread when the agent asked for one."""
    alive_file, period = environ.get(ALIVE_FILE_ENV), environ.get(WATCHDOG_ENV, "")
    if not alive_file:
        return None  # run by hand: nobody to wait for
    try:
        period_s = float(period)
    except ValueError:
        raise ConfigError(f"{WATCHDOG_ENV} must be a number of seconds, got {period!r}") \
            from None
    if not period_s > 0:
        raise ConfigError(f"{WATCHDOG_ENV} must be greater than 0, got {period!r}")
    watchdog = AgentWatchdog(Path(alive_file), period_s)
    threading.Thread(target=watchdog.run_forever, name="agent-watchdog", daemon=True).start()
    log.info("following worker agent %s through %s (%gs)", environ.get(AGENT_PID_ENV, "?"),
             alive_file, period_s)
    return watchdog


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, then serve until drained; return the exit code."""
    try:
        config = load_config(argv)
        start_watchdog(os.environ)
    except ConfigError as exc:
        print(f"swarm-replica: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # Imported here so that a bad command line fails fast, before torch loads.
    from serving.replica.server import run

    return run(config)


if __name__ == "__main__":
    sys.exit(main())
