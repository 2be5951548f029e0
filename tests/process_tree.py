"""What runs on this machine, read from /proc: for tests that start real processes."""

from __future__ import annotations

import os
from pathlib import Path

from scaling.providers import processes


def _read(pid: int, name: str) -> str:
    try:
        return (Path("/proc") / str(pid) / name).read_bytes().decode(errors="replace")
    except OSError:  # gone, or not ours to read
        return ""


def cmdline(pid: int) -> str:
    """Return the process's command line, arguments separated by spaces ("" if gone)."""
    return _read(pid, "cmdline").replace("\0", " ").strip()


def live_processes_mentioning(text: str, *, environment: bool = False) -> list[int]:
    """Return pids of live (non-zombie) processes whose command line (or environment, which
    children inherit: SWARM_VAR_DIR, ARTIFACT_ROOT) contains `text`."""
    found, ours = [], ancestors()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in ours:
            continue
        pid = int(proc.name)
        mentions = text in _read(pid, "cmdline") or (
            environment and text in _read(pid, "environ"))
        if mentions and processes.is_alive(pid):
            found.append(pid)
    return found


def ancestors() -> set[int]:
    """Return this process and those it descends from (they mention what it was given)."""
    found, pid = set(), os.getpid()
    while pid > 1 and pid not in found:
        found.add(pid)
        stat = _read(pid, "stat").rpartition(")")[2].split()
        pid = int(stat[1]) if len(stat) > 1 else 0
    return found


def descendants(pid: int) -> set[int]:
    """Return the live processes that descend from `pid` (children, theirs, ...)."""
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            stat = _read(int(proc.name), "stat").rpartition(")")[2].split()
            if len(stat) > 1:
                parents[int(proc.name)] = int(stat[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items()
                    if parent in frontier and child not in found}
        found |= frontier
    return found


def kill_all(pids: list[int]) -> None:
    """SIGKILL these processes (each re-checked just before)."""
    for pid in pids:
        processes.kill(pid)


def process_group_members(pgid: int) -> list[int]:
    """Return the live processes of the process group `pgid`."""
    members = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and processes.is_alive(int(proc.name)):
            try:
                if os.getpgid(int(proc.name)) == pgid:
                    members.append(int(proc.name))
            except ProcessLookupError:
                continue
    return members


def children_of(pid: int) -> list[int]:
    """Return the live direct children of `pid`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        stat = _read(int(proc.name), "stat")
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and fields[1] == str(pid) and processes.is_alive(int(proc.name)):
            found.append(int(proc.name))
    return found

