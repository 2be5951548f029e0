"""Low-level help for replica server processes: command line, environment, launch, ports."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from serving.agent import survivors
from serving.agent.credentials_tls import TlsFiles
from serving.agent.logs import ROTATED_SUFFIX, STDERR_FILE, STDOUT_FILE
from swarm_protocol.agent_messages import DesiredReplica

log = logging.getLogger(__name__)
REPLICA_MODULE = "serving.replica"
REPLICA_KEY_ENV = "SWARM_REPLICA_KEY"
AGENT_PID_ENV = "SWARM_AGENT_PID"
# The replica's watchdog (serving/replica/__main__.py) reads these two.
ALIVE_FILE_ENV = "SWARM_AGENT_ALIVE_FILE"
WATCHDOG_ENV = "SWARM_AGENT_WATCHDOG_S"
DEFAULT_WATCHDOG_S = 60.0
# A replica gets only these from the agent's environment: the agent may run with the
# portal's secrets (`make run`) or a join token in its environment, and a model file is code.
REPLICA_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
})
REPLICA_ENV_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "PYTORCH_CUDA_")
SIGNATURE_FILE = survivors.SIGNATURE_FILE
STEPS_FILE = "steps.json"
_STDERR_TAIL_BYTES = 4096
# The directory that holds the `serving` package, so the child finds it from any cwd. From this
# file, not serving.__file__: in the worker's wheel `serving` is a namespace package (no file).
_CODE_ROOT = str(Path(__file__).resolve().parents[2])


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
    alive_file: Path | None = None  # None: no watchdog, the replica never drains itself
    watchdog_s: float = DEFAULT_WATCHDOG_S
    tls: TlsFiles | None = None  # the node's key and certificate: serve TLS (direct mode)


class ReplicaProcess(Protocol):
    """What the manager needs of a replica process: ours (Popen) or adopted."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int | None: ...


def replica_env(spec: LaunchSpec, agent_env: Mapping[str, str]) -> dict[str, str]:
    """Return the replica's whole environment: the allow-listed part of ours, plus its own."""
    env = {name: value for name, value in agent_env.items()
           if name in REPLICA_ENV_NAMES or name.startswith(REPLICA_ENV_PREFIXES)}
    env[REPLICA_KEY_ENV] = spec.replica_key  # never on the command line: `ps` shows that
    env[AGENT_PID_ENV] = str(os.getpid())
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (_CODE_ROOT, agent_env.get("PYTHONPATH")) if p)
    if spec.alive_file is not None:
        env[ALIVE_FILE_ENV] = str(spec.alive_file)
        env[WATCHDOG_ENV] = f"{spec.watchdog_s:g}"
    return env


def replica_command(spec: LaunchSpec, signature_path: Path) -> list[str]:
    """Return the argv that starts the replica server described by `spec`."""
    desired = spec.desired
    steps = ["--steps-file", str(spec.replica_dir / STEPS_FILE)] if desired.steps else []
    tls = ([] if spec.tls is None else
           ["--tls-cert-file", str(spec.tls.cert_path), "--tls-key-file", str(spec.tls.key_path)])
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
        *steps,
        *tls,
    ]


def launch_replica(spec: LaunchSpec) -> subprocess.Popen[bytes]:
    """Write the signature file and start the replica in its own process group."""
    spec.replica_dir.mkdir(parents=True, exist_ok=True)
    signature_path = spec.replica_dir / SIGNATURE_FILE
    signature_path.write_text(json.dumps(spec.desired.signature))
    if spec.desired.steps:
        (spec.replica_dir / STEPS_FILE).write_text(json.dumps(spec.desired.steps))
    env = replica_env(spec, os.environ)
    # Append mode (O_APPEND): the agent caps the files by truncating them (logs.LogTail),
    # and the replica's next write must land at the new end, not leave a hole before it.
    with (spec.replica_dir / STDOUT_FILE).open("ab") as stdout, \
            (spec.replica_dir / STDERR_FILE).open("ab") as stderr:
        # A new session: Ctrl-C on the agent's terminal must not kill replicas mid-request
        # (the agent drains them itself), and a replica outlives a killed agent.
        process = subprocess.Popen(
            replica_command(spec, signature_path), env=env, cwd=spec.replica_dir,
            stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True)
    _record_launch(spec, process.pid)
    return process


def _record_launch(spec: LaunchSpec, pid: int) -> None:
    """Leave what a restarted agent needs to adopt this process (see survivors.py)."""
    ticks = survivors.start_ticks(pid)
    if ticks is None:
        return  # gone already: nothing to adopt
    survivors.write_record(spec.replica_dir, survivors.ReplicaRecord(
        replica_id=spec.desired.replica_id, pid=pid, start_ticks=ticks, port=spec.port,
        key_sha256=survivors.key_sha256(spec.replica_key), desired=spec.desired.to_dict()))


def last_stderr_line(replica_dir: Path) -> str:
    """Return the last non-empty line the replica wrote to stderr ('' when none).

    Looks in the rotated part too: the file may have just been capped (logs.LogTail).
    """
    for name in (STDERR_FILE, STDERR_FILE + ROTATED_SUFFIX):
        try:
            with (replica_dir / name).open("rb") as stderr:
                stderr.seek(0, os.SEEK_END)
                stderr.seek(max(stderr.tell() - _STDERR_TAIL_BYTES, 0))
                tail = stderr.read().decode(errors="replace")
        except OSError:
            continue
        lines = [line.strip() for line in tail.splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return ""


def signal_group(process: ReplicaProcess, signum: int) -> None:
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
