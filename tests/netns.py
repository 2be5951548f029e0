"""Linux network namespaces for multi-host tests: one namespace per "GPU server", joined to
the host (where the portal and gateway run) by a veth pair with its own /30.

API (kept stable; other tests build on it):

    from tests.netns import NetnsLab, require_netns

    def test_x() -> None:
        require_netns()                      # pytest.skip with the reason when not possible
        with NetnsLab() as lab:
            node = lab.add_host("gpu1")      # NetnsHost
            node.name                        # unique per run: "swt-<pid>-<tag>-gpu1"
            node.host_address                # "10.231.N.1": the host's end of the link
            node.address                     # "10.231.N.2": the namespace's end
            node.run(["ip", "addr"])         # subprocess.run inside the namespace (check=True)
            proc = node.popen([sys.executable, "-m", ...], env=...)   # subprocess.Popen inside
            node.cut()                       # link down (both ends lose carrier)
            node.restore()                   # link up again, routes put back
            node.pids()                      # pids of processes inside the namespace
        # leaving the block (also on an exception) kills the processes left inside the
        # namespaces, deletes the namespaces and the veth pairs

`add_host(name, default_route=True)`: with `default_route` the namespace routes everything
through the host's end (so it reaches any address the host listens on, e.g. the host end of
another namespace's link); without it, the namespace reaches only `host_address`.

Addresses come from 10.231.0.0/16 (a private range), one /30 per namespace; the third octet
is chosen under a file lock among those no interface on the host uses, so concurrent test runs
do not collide. Traffic goes only to addresses on links the lab made.

Cleanup happens in `__exit__`, in a `weakref.finalize` (interpreter exit, garbage collection),
and at the next lab's start for leftovers of a crashed run: every name carries the pid of the
run that made it, and names whose pid is no longer alive are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import signal
import subprocess
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.waiting import wait_until

PREFIX = "swt"  # every namespace "swt-<pid>-<tag>-<name>", every host veth "swt<tag><i>h"
SUBNET_PREFIX = "10.231"
LOCK_PATH = Path("/tmp/swarm-netns.lock")
COMMAND_TIMEOUT_S = 30.0


def netns_unavailable_reason() -> str | None:
    """Return why network-namespace tests cannot run here, or None when they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network-namespace tests need root (CI runs them as root)"
    if shutil.which("ip") is None:
        return "network-namespace tests need iproute2's `ip` command"
    probe = f"{PREFIX}-{os.getpid()}-probe{secrets.token_hex(2)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True,
                   timeout=COMMAND_TIMEOUT_S)
    return None


def require_netns() -> None:
    """pytest.skip the calling test, with the reason, when namespaces cannot be made here."""
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=COMMAND_TIMEOUT_S)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespace_pids(name: str) -> list[int]:
    listed = _ip("netns", "pids", name, check=False)
    return [int(p) for p in listed.stdout.split() if p.isdigit()]


def _kill_namespace_processes(name: str, timeout_s: float = 10.0) -> None:
    """SIGTERM then SIGKILL whatever still runs inside namespace `name`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _namespace_pids(name)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if not pids:
            return
        try:
            wait_until(lambda: not _namespace_pids(name), timeout_s, interval_s=0.05)
            return
        except AssertionError:
            continue


def _delete_namespace(name: str) -> None:
    _kill_namespace_processes(name)
    _ip("netns", "delete", name, check=False)


def _owner_pid(name: str) -> int | None:
    parts = name.split("-")
    if len(parts) >= 3 and parts[0] == PREFIX and parts[1].isdigit():
        return int(parts[1])
    return None


def remove_leftovers() -> list[str]:
    """Delete namespaces and host veths of runs whose process is gone; return their names."""
    with LOCK_PATH.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a link being made by another run has no alias yet
        return _remove_leftovers_locked()


def _remove_leftovers_locked() -> list[str]:
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        owner = _owner_pid(name)
        if owner is not None and not _pid_alive(owner):
            _delete_namespace(name)
            removed.append(name)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        # "12: swtab12c0h@if11: <...> ... alias swt-<pid>" (the alias names the owner)
        fields = line.split()
        if len(fields) < 2 or not fields[1].startswith(PREFIX):
            continue
        link = fields[1].split("@")[0].rstrip(":")
        alias = fields[fields.index("alias") + 1] if "alias" in fields else ""
        owner = _owner_pid(alias + "-x")
        if owner is None or not _pid_alive(owner):
            _ip("link", "delete", link, check=False)
            removed.append(link)
    return removed


def _used_third_octets() -> set[int]:
    used = set()
    for line in _ip("-o", "-4", "addr", "show", check=False).stdout.splitlines():
        for word in line.split():
            if word.startswith(SUBNET_PREFIX + "."):
                used.add(int(word.split(".")[2]))
    return used


@dataclass
class NetnsHost:
    """One namespace and its link to the host; see the module docstring."""

    name: str
    veth_host: str
    veth_inside: str
    host_address: str
    address: str
    default_route: bool
    popened: list[subprocess.Popen[Any]] = field(default_factory=list)

    def command(self, args: Sequence[str]) -> list[str]:
        """Return `args` prefixed to run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, args: Sequence[str], *, check: bool = True, timeout_s: float = 60.0,
            **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run `args` inside the namespace (stdout/stderr captured as text)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(args), check=check, timeout=timeout_s, **kwargs)

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen `args` inside the namespace; the lab kills it at the end."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.command(args), **kwargs)
        self.popened.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Return the pids of the processes running inside the namespace."""
        return _namespace_pids(self.name)

    def cut(self) -> None:
        """Take the link down: nothing passes between the host and the namespace."""
        _ip("link", "set", self.veth_host, "down")

    def restore(self) -> None:
        """Bring the link back up, with the namespace's routes."""
        _ip("link", "set", self.veth_host, "up")
        if self.default_route:
            self.run(["ip", "route", "replace", "default", "via", self.host_address])

    def _setup(self, owner_alias: str) -> None:
        _ip("netns", "add", self.name)
        _ip("link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_inside)
        _ip("link", "set", self.veth_host, "alias", owner_alias)
        _ip("link", "set", self.veth_inside, "netns", self.name)
        _ip("addr", "add", f"{self.host_address}/30", "dev", self.veth_host)
        _ip("link", "set", self.veth_host, "up")
        self.run(["ip", "link", "set", "lo", "up"])
        self.run(["ip", "addr", "add", f"{self.address}/30", "dev", self.veth_inside])
        self.run(["ip", "link", "set", self.veth_inside, "up"])
        if self.default_route:
            self.run(["ip", "route", "add", "default", "via", self.host_address])

    def _teardown(self) -> None:
        for proc in self.popened:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=COMMAND_TIMEOUT_S)
        _delete_namespace(self.name)
        _ip("link", "delete", self.veth_host, check=False)  # gone with the namespace, normally


def _teardown_all(hosts: list[NetnsHost]) -> None:
    for host in reversed(hosts):
        host._teardown()
    hosts.clear()


class NetnsLab:
    """A set of namespaces made for one test; removed on exit. See the module docstring."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.owner = f"{PREFIX}-{os.getpid()}"
        self.hosts: list[NetnsHost] = []
        self._finalizer = weakref.finalize(self, _teardown_all, self.hosts)

    def __enter__(self) -> NetnsLab:
        remove_leftovers()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill what runs inside, delete every namespace and link this lab made."""
        self._finalizer()

    def add_host(self, name: str, *, default_route: bool = True) -> NetnsHost:
        """Make namespace `name` with a veth link to the host and addresses; return it."""
        assert name.replace("_", "").isalnum() and len(name) <= 20, name
        index = len(self.hosts)
        with LOCK_PATH.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            free = sorted(set(range(1, 255)) - _used_third_octets())
            if not free:
                raise RuntimeError(f"no free /30 left in {SUBNET_PREFIX}.0.0/16")
            octet = free[0]
            host = NetnsHost(
                name=f"{self.owner}-{self.tag}-{name}",
                veth_host=f"{PREFIX}{self.tag}{index}h", veth_inside=f"{PREFIX}{self.tag}{index}n",
                host_address=f"{SUBNET_PREFIX}.{octet}.1", address=f"{SUBNET_PREFIX}.{octet}.2",
                default_route=default_route)
            self.hosts.append(host)  # before setup: a half-made host is still torn down
            host._setup(self.owner)
        return host
