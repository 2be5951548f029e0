"""Low-level help for replica server processes: command line, launch, ports, signals."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import serving
from serving.agent.protocol import DesiredReplica

log = logging.getLogger(__name__)
REPLICA_MODULE = "serving.replica"
REPLICA_KEY_ENV = "SWARM_REPLICA_KEY"
PID_FILE = "pid"
STDERR_FILE = "stderr.log"
STDOUT_FILE = "stdout.log"
SIGNATURE_FILE = "signature.json"
_STDERR_TAIL_BYTES = 4096
# The directory that holds the `serving` package, so the child finds it from any cwd.
_CODE_ROOT = str(Path(serving.__file__).resolve().parent.parent)


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one replica server process."""

    desired: DesiredReplica
    artifact_path: Path
    replica_dir: Path
    bind_host: str
    port: int
    replica_key: str
    replica_module: str = REPLICA_MODULE
    python: str = sys.executable


def replica_command(spec: LaunchSpec, signature_path: Path) -> list[str]:
    """Return the argv that starts the replica server described by `spec`."""
    desired = spec.desired
    return [
        spec.python, "-m", spec.replica_module,
        "--artifact", str(spec.artifact_path),
        "--format", desired.format,
        "--model-name", desired.model_name,
        "--model-version", str(desired.version),
        "--signature-file", str(signature_path),
        "--host", spec.bind_host,
        "--port", str(spec.port),
        "--max-batch-size", str(desired.max_batch_size),
        "--max-queue-delay-ms", str(desired.max_queue_delay_ms),
        "--device", desired.device,
        "--threads", str(desired.threads),
    ]


def launch_replica(spec: LaunchSpec) -> subprocess.Popen[bytes]:
    """Write the signature file and start the replica in its own process group."""
    spec.replica_dir.mkdir(parents=True, exist_ok=True)
    signature_path = spec.replica_dir / SIGNATURE_FILE
    signature_path.write_text(json.dumps(spec.desired.signature))
    env = dict(os.environ)
    env[REPLICA_KEY_ENV] = spec.replica_key
    env["SWARM_AGENT_PID"] = str(os.getpid())  # the replica drains when this process dies
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_CODE_ROOT, env.get("PYTHONPATH")) if p)
    with (spec.replica_dir / STDOUT_FILE).open("wb") as stdout, \
            (spec.replica_dir / STDERR_FILE).open("wb") as stderr:
        # A new session: Ctrl-C on the agent's terminal must not kill replicas mid-request;
        # the agent drains them itself.
        process = subprocess.Popen(
            replica_command(spec, signature_path), env=env, cwd=spec.replica_dir,
            stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True)
    (spec.replica_dir / PID_FILE).write_text(str(process.pid))
    return process


def last_stderr_line(replica_dir: Path) -> str:
    """Return the last non-empty line the replica wrote to stderr ('' when none)."""
    try:
        with (replica_dir / STDERR_FILE).open("rb") as stderr:
            stderr.seek(0, os.SEEK_END)
            stderr.seek(max(stderr.tell() - _STDERR_TAIL_BYTES, 0))
            tail = stderr.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    """Send `signum` to the replica's process group (it and any children it started)."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def port_is_free(host: str, port: int) -> bool:
    """Return whether nothing listens on (host, port) now, by binding to it briefly."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(host: str, port_range: range, taken: Iterable[int], after: int | None) -> int:
    """Return a free port from the range, starting after the last one handed out.

    Going round the range rather than reusing the lowest port keeps a just-stopped
    replica's port idle for a while, so stale gateway connections do not reach a new model.
    """
    taken_ports = set(taken)
    ports = list(port_range)
    start = ports.index(after) + 1 if after is not None and after in port_range else 0
    for port in ports[start:] + ports[:start]:
        if port not in taken_ports and port_is_free(host, port):
            return port
    raise RuntimeError(f"no free port in {port_range.start}-{port_range.stop - 1}")


def stop_orphans(replicas_dir: Path, replica_module: str = REPLICA_MODULE) -> int:
    """SIGTERM replica servers a previous agent run left behind; return how many.

    A pid counts only if /proc shows it still runs the replica module from that very
    directory, so a reused pid is never signalled.
    """
    stopped = 0
    for pid_file in replicas_dir.glob(f"*/{PID_FILE}"):
        pid = _read_pid(pid_file)
        if pid is not None and _runs_replica_from(pid, pid_file.parent, replica_module):
            log.warning("stopping replica process %d left over from a previous run", pid)
            try:
                os.killpg(pid, signal.SIGTERM)
                stopped += 1
            except (ProcessLookupError, PermissionError):
                pass
        pid_file.unlink(missing_ok=True)
    return stopped


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _runs_replica_from(pid: int, replica_dir: Path, replica_module: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    wanted = str(replica_dir / SIGNATURE_FILE).encode()
    return replica_module.encode() in argv and wanted in argv
