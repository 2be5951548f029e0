"""Artifacts on disk, keyed by sha256 and shared by every replica on this node.

A file lands at `<cache>/artifacts/<sha256>` only after its bytes hashed to that sha256,
and it is hashed again before each replica starts from it, so a file damaged on disk is
never served: it is deleted and downloaded once more.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Protocol

import httpx

from serving.agent.client import PortalError

log = logging.getLogger(__name__)
SHA256_HEADER = "X-Artifact-SHA256"
CHUNK_BYTES = 1 << 20
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_PARTIAL_SUFFIX = ".part"


class ArtifactError(RuntimeError):
    """An artifact could not be fetched or did not hash to what it should."""


class ArtifactSource(Protocol):
    """Where artifacts come from: the portal client."""

    def open_artifact(self, sha256: str) -> contextlib.AbstractContextManager[httpx.Response]: ...


def file_sha256(path: Path, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactCache:
    """Verified artifact files under `<root>/artifacts/`, safe to use from several threads."""

    def __init__(self, root: Path, source: ArtifactSource,
                 cancelled: threading.Event | None = None) -> None:
        self.artifacts_dir = root / "artifacts"
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        self._source = source
        self._cancelled = cancelled or threading.Event()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def path_for(self, sha256: str) -> Path:
        """Return where the artifact with this sha256 lives (whether or not it is there)."""
        if not _SHA256_RE.match(sha256):
            raise ArtifactError(f"not a sha256: {sha256!r}")
        return self.artifacts_dir / sha256

    def cached_sha256s(self) -> list[str]:
        """Return the sha256s of the artifacts on disk, sorted."""
        return sorted(p.name for p in self.artifacts_dir.iterdir() if _SHA256_RE.match(p.name))

    def ensure(self, sha256: str, size_bytes: int | None = None) -> Path:
        """Return the path of a file verified to hash to `sha256`, downloading it if needed."""
        path = self.path_for(sha256)
        with self._lock_for(sha256):
            if path.exists():
                actual = file_sha256(path)
                if actual == sha256:
                    return path
                log.warning("cached artifact %s is corrupt (its bytes hash to %s): "
                            "deleting it and downloading it again", sha256, actual)
                path.unlink(missing_ok=True)
            return self._download(sha256, size_bytes)

    def remove_partial_downloads(self) -> int:
        """Delete temp files a previous run left behind; return how many."""
        leftovers = list(self.artifacts_dir.glob(f".*{_PARTIAL_SUFFIX}"))
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)
        return len(leftovers)

    def _lock_for(self, sha256: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(sha256, threading.Lock())

    def _download(self, sha256: str, size_bytes: int | None) -> Path:
        self._check_disk_space(sha256, size_bytes)
        fd, temp_name = tempfile.mkstemp(dir=self.artifacts_dir, prefix=f".{sha256}.",
                                         suffix=_PARTIAL_SUFFIX)
        temp_path = Path(temp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                actual = self._stream_into(sha256, out)
            if actual != sha256:
                raise ArtifactError(f"artifact {sha256} downloaded with the wrong content: "
                                    f"its bytes hash to {actual}")
            temp_path.chmod(0o444)  # replicas only read it; guard against stray writes
            path = self.path_for(sha256)
            os.replace(temp_path, path)
        except BaseException:
            temp_path.unlink(missing_ok=True)
            raise
        log.info("artifact %s downloaded (%d bytes)", sha256, path.stat().st_size)
        return path

    def _stream_into(self, sha256: str, out: BinaryIO) -> str:
        """Write the portal's bytes to `out`, checking the header; return their sha256."""
        digest = hashlib.sha256()
        try:
            with self._source.open_artifact(sha256) as response:
                announced = response.headers.get(SHA256_HEADER)
                if announced is None:
                    raise ArtifactError(f"artifact {sha256}: the portal's reply lacks "
                                        f"the {SHA256_HEADER} header")
                if announced.strip().lower() != sha256:
                    raise ArtifactError(f"artifact {sha256}: the portal announced sha256 "
                                        f"{announced} instead")
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    if self._cancelled.is_set():
                        raise ArtifactError(f"artifact {sha256}: download cancelled")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except PortalError as error:
            raise ArtifactError(f"download failed: {error}") from error
        return digest.hexdigest()

    def _check_disk_space(self, sha256: str, size_bytes: int | None) -> None:
        if not size_bytes:
            return
        free_bytes = shutil.disk_usage(self.artifacts_dir).free
        if free_bytes < size_bytes:
            raise ArtifactError(f"artifact {sha256}: needs {size_bytes} bytes, only "
                                f"{free_bytes} free in {self.artifacts_dir}")
