"""Detached processes on this machine, seen from any process (no Django).

A process started here outlives the one that started it (a Celery pool child, the
launcher), so it is never our child to wait for: it is detached through a short-lived
shell, which we reap at once, and then watched through /proc. A pid counts as alive
only while it exists, is not a zombie, and still has the start time we recorded (a
recycled pid is someone else).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

DEAD_STATES = frozenset("ZXx")  # zombie, dead
_START_TIME_FIELD = 19  # field 22 of /proc/PID/stat, counted after the ")" that ends comm
# `$!` is the background job's pid, which `exec` keeps: the agent itself, not a shell.
_DETACH_SCRIPT = 'log=$1; shift; exec "$@" </dev/null >>"$log" 2>&1 & echo $!'


def start_ticks(pid: int) -> int | None:
    """Return the process's start time (clock ticks after boot), or None if it is not alive."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat.rpartition(")")[2].split()
    if not fields or fields[0] in DEAD_STATES:
        return None
    return int(fields[_START_TIME_FIELD])


def is_alive(pid: int, expected_start_ticks: int | None = None) -> bool:
    """Return whether the process runs (not a zombie), and is the one started then."""
    ticks = start_ticks(pid)
    if ticks is None:
        return False
    return expected_start_ticks is None or ticks == expected_start_ticks


def spawn_detached(command: Sequence[str], log_path: Path, *, cwd: Path,
                   env: Mapping[str, str]) -> int:
    """Start `command` in its own session, output appended to `log_path`; return its pid."""
    shell = subprocess.run(
        ["/bin/sh", "-c", _DETACH_SCRIPT, "sh", str(log_path), *command], cwd=cwd,
        env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, check=True,
        start_new_session=True, text=True, timeout=30)
    return int(shell.stdout.strip())


def send_signal(pid: int, sig: int, expected_start_ticks: int | None = None) -> bool:
    """Signal the process if it is still the one we started; return whether it was."""
    if not is_alive(pid, expected_start_ticks):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def wait_for_exit(pids: Mapping[int, int | None], timeout_s: float,
                  poll_s: float = 0.1) -> set[int]:
    """Wait until these processes ({pid: start ticks}) exit; return the pids still alive."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = {pid for pid, ticks in pids.items() if is_alive(pid, ticks)}
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(poll_s)


def pids_mentioning(text: str) -> dict[int, int]:
    """Return {pid: start ticks} of the live processes whose command line contains `text`."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:  # gone already
            continue
        ticks = start_ticks(int(proc.name)) if text in cmdline else None
        if ticks is not None:
            found[int(proc.name)] = ticks
    return found


def kill(pid: int, expected_start_ticks: int | None = None) -> bool:
    """SIGKILL the process if it is still the one we started; return whether it was."""
    return send_signal(pid, signal.SIGKILL, expected_start_ticks)
