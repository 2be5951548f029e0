"""Run the artifact check in a child process with a time and a memory limit."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ArtifactRejected(Exception):
    """The artifact failed validation; the message is for the uploader."""


@dataclass(frozen=True)
class ValidationResult:
    format: str
    outputs: list[dict[str, Any]]


def _limit_memory(memory_bytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    return apply


def validate_artifact(
    path: Path,
    signature: dict[str, Any],
    declared_format: str | None,
    *,
    timeout_s: float,
    memory_bytes: int,
) -> ValidationResult:
    """Load `path` in a child, run one forward pass, and check the outputs; raise on refusal."""
    request = json.dumps({"path": str(path), "format": declared_format, "signature": signature})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    project_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [project_root, env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "registry.inspect_child"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=project_root,
        preexec_fn=_limit_memory(memory_bytes),
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(request.encode(), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise ArtifactRejected(
            f"validation timed out: loading the model and one forward pass took longer than "
            f"{timeout_s:g} s"
        ) from None
    return _parse_reply(proc.returncode, stdout, stderr)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def _parse_reply(returncode: int, stdout: bytes, stderr: bytes) -> ValidationResult:
    lines = [line for line in stdout.decode(errors="replace").splitlines() if line.strip()]
    try:
        reply = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        reply = None
    if not isinstance(reply, dict):
        raise ArtifactRejected(_crash_message(returncode, stderr))
    if not reply.get("ok"):
        raise ArtifactRejected(str(reply.get("error", "the artifact was refused")))
    return ValidationResult(format=reply["format"], outputs=reply["outputs"])


def _crash_message(returncode: int, stderr: bytes) -> str:
    tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
    if returncode < 0:
        sig = signal.Signals(-returncode).name
        return f"validation crashed loading the model ({sig}); it may exceed the memory limit"
    if "MemoryError" in tail[0] or "memory" in tail[0].lower():
        return "the model needed more memory than the validation limit"
    return f"validation failed loading the model: {tail[0][:300] or 'exit ' + str(returncode)}"
