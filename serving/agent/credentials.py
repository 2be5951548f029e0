"""The node's credentials on disk, so that a restarted agent needs no new join token."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from swarm_protocol.private_files import write_private

log = logging.getLogger(__name__)
CREDENTIALS_FILE = "credentials.json"
LOCK_FILE = "agent.lock"
_PRIVATE_DIR_MODE = 0o700
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_GROUP_OR_OTHER_READ = stat.S_IRGRP | stat.S_IROTH
_TOKEN_FILE_MAX_BYTES = 4096


class TokenFileError(ValueError):
    """A join token file this agent refuses to use; the message says why and what to do."""


@dataclass(frozen=True)
class NodeCredentials:
    """What the portal gave this node when it joined."""

    portal_url: str
    node_id: int
    node_secret: str
    replica_key: str


def node_state_dir(cache_dir: Path, node_name: str) -> Path:
    """Return this node's own directory in the cache (credentials, replica logs), created 0700.

    Keyed by node name so that two agents on one machine can share the artifact cache.
    """
    safe_name = _UNSAFE_NAME_CHARS.sub("_", node_name) or "node"
    path = cache_dir / "nodes" / safe_name
    path.mkdir(parents=True, exist_ok=True, mode=_PRIVATE_DIR_MODE)
    return path


class NodeDirBusy(RuntimeError):
    """Another agent already runs as this node from this cache directory."""


def lock_node_dir(state_dir: Path) -> IO[bytes]:
    """Return an open lock file held until it is closed or the process ends.

    Two agents acting as one node would stop each other's replicas as orphans.
    """
    lock = (state_dir / LOCK_FILE).open("ab")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise NodeDirBusy(f"another agent is running with {state_dir}: give this one its own "
                          "--name or --cache-dir") from None
    return lock


def load_credentials(state_dir: Path, portal_url: str) -> NodeCredentials | None:
    """Return stored credentials for this portal, or None (missing, unreadable, other portal)."""
    path = state_dir / CREDENTIALS_FILE
    try:
        raw = json.loads(path.read_text())
        credentials = NodeCredentials(
            portal_url=str(raw["portal_url"]), node_id=int(raw["node_id"]),
            node_secret=str(raw["node_secret"]), replica_key=str(raw["replica_key"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("ignoring unreadable credentials in %s: %s", path, error)
        return None
    if credentials.portal_url.rstrip("/") != portal_url.rstrip("/"):
        log.warning("credentials in %s belong to %s, not %s: ignoring them",
                    path, credentials.portal_url, portal_url)
        return None
    return credentials


def save_credentials(state_dir: Path, credentials: NodeCredentials) -> Path:
    """Write the credentials atomically to a file only this user can read (0600)."""
    path = state_dir / CREDENTIALS_FILE
    # 0600 from the first byte: the secret is never readable by others, not even briefly.
    write_private(path, json.dumps(asdict(credentials), indent=2).encode())
    return path


def forget_credentials(state_dir: Path) -> None:
    """Delete the stored credentials (the portal revoked them)."""
    (state_dir / CREDENTIALS_FILE).unlink(missing_ok=True)


def read_join_token_file(path: Path) -> str:
    """Return the join token in `path`: a regular file only its owner may read.

    The file is opened once and checked through that descriptor, so what is checked is what
    is read. It is left in place: the worker deletes nothing of the user's.
    """
    try:
        # O_NONBLOCK: a FIFO given by mistake must not hang the agent before the check.
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as error:
        raise TokenFileError(f"cannot open the join token file {path}: "
                             f"{error.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TokenFileError(f"the join token file {path} is not a regular file")
        if info.st_mode & _GROUP_OR_OTHER_READ:
            raise TokenFileError(
                f"the join token file {path} is readable by other users (mode "
                f"{stat.S_IMODE(info.st_mode):04o}): run `chmod 600 {path}` and start again")
        raw = os.read(fd, _TOKEN_FILE_MAX_BYTES + 1)
    finally:
        os.close(fd)
    token = raw.decode(errors="replace").strip()
    if not token or len(raw) > _TOKEN_FILE_MAX_BYTES or any(ch.isspace() for ch in token):
        raise TokenFileError(f"the join token file {path} must hold one join token")
    return token
