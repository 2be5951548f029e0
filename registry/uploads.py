"""Stream a multipart artifact straight into the store's staging area.

Django's own handlers keep small files in memory and copy big ones through a temp
file; this one writes each chunk once, hashing and counting as it goes, and stops
the upload as soon as it passes MAX_UPLOAD_BYTES.
"""

from __future__ import annotations

from typing import Any

from django.core.files.uploadedfile import SimpleUploadedFile, UploadedFile
from django.core.files.uploadhandler import FileUploadHandler

from registry.storage import ArtifactStore, StagingFile
from swarm_portal.errors import PayloadTooLarge, ServiceError
from swarm_protocol.steps import MAX_LABELS_FILE_BYTES

ARTIFACT_FIELD = "artifact"
LABELS_FIELD = "labels"  # a small text file (class labels), kept in memory


class UploadTooLarge(PayloadTooLarge):
    """The request body is larger than MAX_UPLOAD_BYTES."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(f"the upload exceeds MAX_UPLOAD_BYTES ({limit_bytes} bytes)")
        self.limit_bytes = limit_bytes


class UnexpectedFile(ServiceError):
    """A file arrived in a field other than the artifact field, or twice."""


class StagedUpload(UploadedFile):
    """What request.FILES holds for the artifact: a closed staging file."""

    def __init__(self, staging: StagingFile, name: str, content_type: str) -> None:
        super().__init__(file=None, name=name, content_type=content_type,
                         size=staging.size_bytes)
        self.staging = staging

    def close(self) -> None:  # the staging file is owned by the upload handler
        return None


class StagingUploadHandler(FileUploadHandler):
    """Write the artifact field into a StagingFile and keep a small labels file in memory;
    refuse everything else."""

    chunk_size = 1024 * 1024

    def __init__(self, store: ArtifactStore, limit_bytes: int, request: Any = None) -> None:
        super().__init__(request)
        self.store = store
        self.limit_bytes = limit_bytes
        self.staging: StagingFile | None = None
        self._upload: StagedUpload | None = None
        self.labels: bytearray | None = None
        self._field: str | None = None

    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        if content_length and content_length > self.limit_bytes + 64 * 1024:
            raise UploadTooLarge(self.limit_bytes)
        return None

    def new_file(self, field_name, file_name, content_type, content_length, charset=None,
                 content_type_extra=None):
        super().new_file(field_name, file_name, content_type, content_length, charset,
                         content_type_extra)
        self._field = field_name
        if field_name == LABELS_FIELD and self.labels is None:
            self.labels = bytearray()
            return
        if field_name != ARTIFACT_FIELD or self.staging is not None:
            raise UnexpectedFile(f"only the model file (field {ARTIFACT_FIELD!r}) and a labels "
                                 f"file (field {LABELS_FIELD!r}) are accepted, once each")
        self.staging = self.store.stage(suffix=".upload")

    def receive_data_chunk(self, raw_data: bytes, start: int) -> None:
        if self._field == LABELS_FIELD:
            assert self.labels is not None
            if len(self.labels) + len(raw_data) > MAX_LABELS_FILE_BYTES:
                raise PayloadTooLarge(f"the labels file exceeds {MAX_LABELS_FILE_BYTES} bytes")
            self.labels.extend(raw_data)
            return None
        assert self.staging is not None
        if self.staging.size_bytes + len(raw_data) > self.limit_bytes:
            raise UploadTooLarge(self.limit_bytes)
        self.staging.write(raw_data)
        return None

    def file_complete(self, file_size: int) -> UploadedFile | None:
        if self._field == LABELS_FIELD:
            assert self.labels is not None
            return SimpleUploadedFile(self.file_name or "labels.txt", bytes(self.labels),
                                      "text/plain")
        assert self.staging is not None
        self.staging.close()
        self._upload = StagedUpload(self.staging, self.file_name or "artifact",
                                    self.content_type or "application/octet-stream")
        return self._upload

    def discard(self) -> None:
        """Delete whatever was staged (after a refusal or a committed copy)."""
        if self.staging is not None:
            self.staging.discard()
