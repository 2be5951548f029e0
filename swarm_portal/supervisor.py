"""Keep child processes running: restart what died, with back-off; stop whole groups.

Each child runs in its own session, so its process group holds it and everything it
started (Celery's pool processes, the portal's helpers). A child that dies is restarted
after a delay that doubles with each quick death (capped) and starts again from the
first step once the child has run for `stable_s`. Before a restart, and when stopping,
the whole group is signalled, so a Celery pool process whose parent was killed does not
linger, still connected to the broker. Each child also asks the kernel for SIGTERM when
the supervisor dies (PR_SET_PDEATHSIG), so a supervisor killed with SIGKILL does not
leave its children running either.

No Django here: the launcher runs this before the portal exists.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Loaded here, not in the child: between fork and exec only async-signal-safe work is safe.
_LIBC = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Backoff:
    """How long to wait before restarting a child that died `failures` times in a row."""

    first_s: float = 0.5
    factor: float = 2.0
    max_s: float = 30.0
    stable_s: float = 30.0  # a child that ran this long counts as healthy again

    def delay_s(self, failures: int) -> float:
        """Return the delay before the restart that follows `failures` quick deaths."""
        if failures <= 0:
            return 0.0
        return min(self.max_s, self.first_s * self.factor ** (failures - 1))


@dataclass(frozen=True)
class ChildSpec:
    """A command to keep running."""

    name: str
    command: Sequence[str]
    cwd: Path
    env: Mapping[str, str]
    stop_timeout_s: float = 40.0
    # Descriptors the child inherits (the portal's listening socket, held by the launcher).
    pass_fds: Sequence[int] = ()
    # Where its stdout and stderr go (appended); None: the supervisor's own.
    log_path: Path | None = None


@dataclass
class Child:
    """One supervised child and what we know of its runs."""

    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    started_at_s: float = 0.0
    failures: int = 0  # deaths in a row, each before `stable_s`
    restart_at_s: float | None = None
    restarts: int = 0

    @property
    def pid(self) -> int | None:
        """Return the running process's pid (also its process group id), or None."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None


@dataclass
class Supervisor:
    """Starts children, restarts those that die, stops them all in a given order."""

    specs: Sequence[ChildSpec]
    backoff: Backoff = field(default_factory=Backoff)
    clock: Callable[[], float] = time.monotonic
    children: dict[str, Child] = field(init=False)

    def __post_init__(self) -> None:
        self.children = {spec.name: Child(spec) for spec in self.specs}

    def start_all(self) -> None:
        """Start every child."""
        for child in self.children.values():
            self._start(child)

    def step(self) -> bool:
        """Notice deaths and restart what is due; return whether anything changed."""
        now_s = self.clock()
        changed = False
        for child in self.children.values():
            if child.restart_at_s is None and child.proc is not None \
                    and child.proc.poll() is not None:
                self._record_death(child, now_s)
                changed = True
            if child.restart_at_s is not None and now_s >= child.restart_at_s:
                self._start(child)
                child.restarts += 1
                changed = True
        return changed

    def _record_death(self, child: Child, now_s: float) -> None:
        assert child.proc is not None
        ran_s = now_s - child.started_at_s
        child.failures = 1 if ran_s >= self.backoff.stable_s else child.failures + 1
        delay_s = self.backoff.delay_s(child.failures)
        log.warning("%s (pid %d) exited with %s after %.1f s: restarting in %.1f s",
                    child.spec.name, child.proc.pid, child.proc.returncode, ran_s, delay_s)
        # Whatever it started may still run (a Celery pool process): end the group first.
        kill_group(child.proc.pid, signal.SIGKILL)
        child.restart_at_s = now_s + delay_s

    def _start(self, child: Child) -> None:
        spec = child.spec
        parent_pid = os.getpid()
        output = spec.log_path.open("ab") if spec.log_path is not None else None
        try:
            child.proc = subprocess.Popen(  # preexec_fn is safe: the launcher runs no threads
                list(spec.command), cwd=spec.cwd, env=dict(spec.env), start_new_session=True,
                pass_fds=tuple(spec.pass_fds), stdout=output,
                stderr=subprocess.STDOUT if output is not None else None,
                preexec_fn=lambda: _die_with_parent(parent_pid))
        finally:
            if output is not None:
                output.close()  # the child has its own copy
        child.started_at_s = self.clock()
        child.restart_at_s = None

    def stop(self, names: Sequence[str]) -> None:
        """Stop these children together: SIGTERM each, then SIGKILL its whole group once it
        has exited (or after its stop timeout)."""
        children = [self.children[name] for name in names]
        for child in children:
            child.restart_at_s = None
            if child.proc is not None and child.proc.poll() is None:
                # The leader only: Celery stops its own pool (a pool process signalled
                # directly is reported as an error), uvicorn its own connections.
                child.proc.send_signal(signal.SIGTERM)
        for child in children:
            if child.proc is not None:
                _wait_then_kill(child.proc, child.spec.stop_timeout_s)


def kill_group(pgid: int, sig: int) -> bool:
    """Signal the process group `pgid`; return whether it still had members."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _wait_then_kill(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("pid %d did not stop in %g s: killing its group", proc.pid, timeout_s)
    # The leader is gone (or about to be): nothing it started may outlive it.
    kill_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _die_with_parent(parent_pid: int) -> None:
    """Ask for SIGTERM when the supervisor dies (runs in the child, before exec)."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
