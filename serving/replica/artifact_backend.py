"""What the ONNX and generation backends share: their four constructor fields and the
archive inspector run at load, its refusal turned into the runner's LoadError."""

from __future__ import annotations

from typing import ClassVar

from serving.replica.runner import LoadError
from swarm_protocol.archive import ArchiveRefused, InspectedArchive, inspect_archive
from swarm_protocol.signature import Signature


def inspected(artifact_path: str, artifact_format: str) -> InspectedArchive:
    """Return the artifact as the archive inspector passed it; raise LoadError if refused.

    A worker never trusts the portal's earlier check: the same inspector runs here, and the
    loaders take only what it returns (swarm_protocol/archive.py).
    """
    try:
        return inspect_archive(artifact_path, declared_format=artifact_format)
    except ArchiveRefused as exc:
        raise LoadError(f"the {artifact_format} artifact {artifact_path} could not be loaded: "
                        f"the archive inspector refused it: {exc}") from None


class ArtifactBackend:
    """A backend serving one artifact file of `artifact_format` on `device` (e.g. "cpu",
    "cuda:0") with `threads` intra-op threads, for `signature`."""

    artifact_format: ClassVar[str]

    def __init__(self, artifact_path: str, device: str, signature: Signature,
                 threads: int) -> None:
        self.artifact_path = artifact_path
        self.device = device
        self.signature = signature
        self.threads = threads

    def inspected(self) -> InspectedArchive:
        """Return the artifact as the archive inspector passed it; raise LoadError."""
        return inspected(self.artifact_path, self.artifact_format)
