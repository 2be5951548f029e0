"""Content-addressed artifact storage under ARTIFACT_ROOT.

Artifacts are written to a staging file while they stream in, then moved into
place by sha256 with an atomic rename, so a reader never sees half a file and
identical uploads share one file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class StoredArtifact:
    """A finished artifact: its name inside the store, sha256 and size."""

    name: str
    sha256: str
    size_bytes: int


class StagingFile:
    """A file being written: hashes and counts bytes as they arrive."""

    def __init__(self, root: Path, suffix: str = "") -> None:
        staging_dir = root / "staging"
        staging_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=staging_dir, suffix=suffix)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size_bytes = 0

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size_bytes += len(chunk)

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def discard(self) -> None:
        """Close and delete the staging file; safe to call twice."""
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


class ArtifactStore:
    """Files named by their sha256, under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def stage(self, suffix: str = "") -> StagingFile:
        return StagingFile(self.root, suffix)

    def name_for(self, sha256: str) -> str:
        return f"sha256/{sha256[:2]}/{sha256}"

    def path(self, name: str) -> Path:
        resolved = (self.root / name).resolve()
        if self.root.resolve() not in resolved.parents:
            raise ValueError(f"artifact name escapes the store: {name!r}")
        return resolved

    def commit(self, staging: StagingFile) -> tuple[StoredArtifact, bool]:
        """Move a closed staging file into place; return it and whether it is new."""
        staging.close()
        name = self.name_for(staging.sha256)
        target = self.path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        created = not target.exists()
        if created:
            os.replace(staging.path, target)
            os.chmod(target, 0o444)
        else:
            staging.discard()
        return StoredArtifact(name, staging.sha256, staging.size_bytes), created

    def delete(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def iter_chunks(self, name: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        with self.path(name).open("rb") as handle:
            while chunk := handle.read(chunk_bytes):
                yield chunk

    def stored_names(self) -> set[str]:
        """Return every committed artifact's name (for tests and pruning)."""
        base = self.root / "sha256"
        if not base.exists():
            return set()
        return {str(p.relative_to(self.root)) for p in base.glob("*/*") if p.is_file()}

    def staging_names(self) -> set[str]:
        base = self.root / "staging"
        return {p.name for p in base.iterdir()} if base.exists() else set()
