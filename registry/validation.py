"""Run the artifact check in a sandboxed child process with a time and a memory limit.

The child loads an untrusted file, so it gets as little as we can give: a minimal
environment (no secrets, no database or Redis URL), its own session, a fresh home
directory, and, when the portal runs as root, no network (`unshare --net`) and an
unprivileged user (`setpriv`, or Popen's user/group). It reads the artifact from a
descriptor the parent opened, so the store's files need no wider permissions.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from swarm_protocol.archive import ArchiveLimits

log = logging.getLogger(__name__)
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
SANDBOX_USER = "nobody"
NOBODY_ID = 65534
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
THREAD_LIMITS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


class ArtifactRejected(Exception):
    """The artifact failed validation; the message is for the uploader."""


@dataclass(frozen=True)
class ValidationResult:
    """What the child saw: format, outputs of one pass, the signature used, file facts."""

    format: str
    outputs: list[dict[str, Any]]
    signature: dict[str, Any] = field(default_factory=dict)  # declared, or read from the file
    info: dict[str, Any] = field(default_factory=dict)  # ONNX opset/producer, inferred or not
    steps: dict[str, Any] = field(default_factory=dict)  # checked against the signature


@dataclass(frozen=True)
class SandboxPlan:
    """How the child is started: a command prefix and the user it runs as."""

    prefix: list[str] = field(default_factory=list)
    uid: int | None = None  # None: the portal's own user (the portal is not root)
    gid: int | None = None
    popen_user: bool = False  # drop the user through Popen (no setpriv here)
    isolated_network: bool = False
    # Why the child keeps the portal's user although the portal is root: the sandbox user
    # cannot read the code or the Python environment (a virtualenv under /root, say).
    kept_user_because: str | None = None


def sandbox_plan(euid: int, which: Callable[[str], str | None] = shutil.which,
                 user: str = SANDBOX_USER,
                 probe: Callable[[SandboxPlan], str | None] | None = None) -> SandboxPlan:
    """Return how to start the child: as root, drop to `user` and unshare the network."""
    if euid != 0:
        # Not root: no new network namespace or other user is possible without
        # privileges; the child still gets the minimal environment and limits.
        return SandboxPlan()
    uid, gid = _user_ids(user)
    unshare, setpriv = which("unshare"), which("setpriv")
    if unshare and setpriv:
        # The namespace must be made while still root, then the user dropped: Popen's
        # user= drops before any preexec_fn, so two small exec wrappers do it in order.
        plan = SandboxPlan(
            prefix=[unshare, "--net", "--", setpriv, f"--reuid={uid}", f"--regid={gid}",
                    "--clear-groups", "--no-new-privs", "--"],
            uid=uid, gid=gid, isolated_network=True)
    else:
        plan = SandboxPlan(uid=uid, gid=gid, popen_user=True)
    problem = (probe or probe_sandbox)(plan)
    if problem is None:
        return plan
    # Dropping to a user who cannot import torch or our code would refuse every upload:
    # keep the network and environment walls, and say loudly how to get the user back.
    reason = (f"the sandbox user {user!r} cannot use this installation ({problem}): "
              f"install the portal and its virtualenv where other users can read them "
              f"(not under /root)")
    _warn_once(reason)
    return SandboxPlan(prefix=[unshare, "--net", "--"] if unshare else [],
                       isolated_network=bool(unshare), kept_user_because=reason)


@functools.cache
def _warn_once(reason: str) -> None:
    log.warning("validation child runs as the portal's user: %s", reason)


_PROBE = ("import importlib.util, swarm_protocol.archive; "
          "assert importlib.util.find_spec('torch'), 'torch is not importable'")


def probe_sandbox(plan: SandboxPlan) -> str | None:
    """Return why the sandbox user cannot run the child here (None: it can), once a process.

    A virtualenv under /root is invisible to `nobody`: the child would find neither torch
    nor our code. Tried for real (finding torch, not importing it: about 50 ms).
    """
    key = (tuple(plan.prefix), plan.uid, plan.gid, plan.popen_user)
    if key not in _probed:
        _probed[key] = _probe(plan)
    return _probed[key]


_probed: dict[tuple[Any, ...], str | None] = {}


def _probe(plan: SandboxPlan) -> str | None:
    with sandbox_home(plan) as home:
        kwargs = popen_arguments(["-c", _PROBE], plan, home, 2 * 1024**3)
        kwargs["stdin"] = subprocess.DEVNULL
        try:
            proc = subprocess.Popen(**kwargs)
            _, stderr = proc.communicate(timeout=60)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"{type(error).__name__}: {error}"
    if proc.returncode == 0:
        return None
    lines = stderr.decode(errors="replace").strip().splitlines()
    return (lines[-1] if lines else f"exit {proc.returncode}")[:300]


def _user_ids(user: str) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:  # an image without a passwd entry: nobody's conventional ids
        return NOBODY_ID, NOBODY_ID
    return entry.pw_uid, entry.pw_gid


def child_environment(home_dir: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the child's whole environment: nothing of the portal's but PATH and LANG."""
    base = os.environ if base is None else base
    return {
        "PATH": base.get("PATH") or DEFAULT_PATH,
        "LANG": base.get("LANG") or "C.UTF-8",
        "HOME": home_dir,
        "TMPDIR": home_dir,
        "PYTHONPATH": PROJECT_ROOT,
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1",
        **THREAD_LIMITS,
    }


def popen_arguments(python_args: list[str], plan: SandboxPlan, home_dir: str,
                    memory_bytes: int, pass_fds: tuple[int, ...] = ()) -> dict[str, Any]:
    """Return the keyword arguments of subprocess.Popen for a sandboxed Python child."""
    kwargs: dict[str, Any] = {
        "args": [*plan.prefix, sys.executable, *python_args],
        "stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE,
        "env": child_environment(home_dir), "cwd": home_dir, "pass_fds": pass_fds,
        "preexec_fn": _limit_memory(memory_bytes), "start_new_session": True,
    }
    if plan.popen_user:
        kwargs.update(user=plan.uid, group=plan.gid, extra_groups=[])
    return kwargs


@contextlib.contextmanager
def sandbox_home(plan: SandboxPlan):
    """Yield a fresh home directory the child's user owns; remove it afterwards."""
    home = tempfile.mkdtemp(prefix="swarm-validate-")
    try:
        if plan.uid is not None:
            os.chown(home, plan.uid, plan.gid if plan.gid is not None else -1)
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _limit_memory(memory_bytes: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file of a model's memory

    return apply


def validate_artifact(
    path: Path,
    signature: dict[str, Any] | None,
    declared_format: str | None,
    *,
    timeout_s: float,
    memory_bytes: int,
    limits: ArchiveLimits | None = None,
    example_input: Any = None,
    steps: Any = None,
) -> ValidationResult:
    """Load `path` in a sandboxed child, run one forward pass, check outputs; raise on refusal.

    `signature` None: the child reads it from the file (TorchScript needs `example_input`).
    """
    plan = sandbox_plan(os.geteuid())
    with open(path, "rb") as artifact, sandbox_home(plan) as home:
        request = json.dumps({"fd": artifact.fileno(), "format": declared_format,
                              "signature": signature, "example_input": example_input,
                              "steps": steps,
                              "limits": asdict(limits or ArchiveLimits())})
        proc = subprocess.Popen(**popen_arguments(["-m", "registry.inspect_child"], plan, home,
                                                  memory_bytes, (artifact.fileno(),)))
        try:
            stdout, stderr = proc.communicate(request.encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise ArtifactRejected(
                f"validation timed out: loading the model and one forward pass took longer "
                f"than {timeout_s:g} s"
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
    return ValidationResult(format=reply["format"], outputs=reply["outputs"],
                            signature=reply.get("signature", {}), info=reply.get("info", {}),
                            steps=reply.get("steps", {}))


def _crash_message(returncode: int, stderr: bytes) -> str:
    tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
    if returncode < 0:
        sig = signal.Signals(-returncode).name
        return f"validation crashed loading the model ({sig}); it may exceed the memory limit"
    if "MemoryError" in tail[0] or "memory" in tail[0].lower():
        return "the model needed more memory than the validation limit"
    return f"validation failed loading the model: {tail[0][:300] or 'exit ' + str(returncode)}"
