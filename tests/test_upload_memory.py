"""A large upload streams to storage: the portal's memory stays flat (measured, not timed)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from knox.models import AuthToken

from registry.models import ModelVersion
from tests import factories
from tests.conftest import free_port
from tests.factories import SIGNATURE
from tests.live import LivePortal

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

UPLOAD_BYTES = int(os.environ.get("SWARM_BIG_UPLOAD_BYTES", 512 * 1024**2))
MEMORY_BUDGET_KIB = 100 * 1024
CHUNK_BYTES = 1024 * 1024


def padded_torchscript(path: Path, total_bytes: int) -> Path:
    """Write a valid TorchScript MLP padded with an extra file to about `total_bytes`."""
    import torch

    from registry.demo import build_mlp

    padding = b"\0" * total_bytes
    torch.jit.save(torch.jit.script(build_mlp()), str(path),
                   _extra_files={"padding.bin": padding})
    return path


def multipart_stream(path: Path, boundary: str) -> tuple[Iterator[bytes], int]:
    """Return a streaming multipart body (signature field, then the file) and its length."""
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"signature\"\r\n\r\n"
            f"{json.dumps(SIGNATURE)}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"artifact\"; "
            f"filename=\"big.pt\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        yield head
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                yield chunk
        yield tail

    return chunks(), len(head) + path.stat().st_size + len(tail)


def test_a_large_upload_does_not_grow_the_portal_memory(operator, tmp_path, artifact_root):
    model = factories.make_model(operator, name="big")
    _, token = AuthToken.objects.create(user=operator, expiry=None)
    path = padded_torchscript(tmp_path / "big.pt", UPLOAD_BYTES)
    portal = LivePortal(free_port(), artifact_root,
                        MAX_UPLOAD_BYTES=str(UPLOAD_BYTES * 2)).start()
    try:
        headers = {"Authorization": f"Token {token}"}
        url = f"{portal.url}/api/models/{model.name}/versions/"
        with httpx.Client(timeout=300) as client:
            # Warm up: imports and first-request work happen before the measurement.
            assert client.get(f"{portal.url}/api/models/", headers=headers).status_code == 200
            portal.reset_peak_memory()
            before_kib = portal.memory_kib("VmRSS")
            body, length = multipart_stream(path, "swarm-test-boundary")
            response = client.post(url, content=body, headers={
                **headers, "Content-Length": str(length),
                "Content-Type": "multipart/form-data; boundary=swarm-test-boundary"})
            peak_kib = portal.memory_kib("VmHWM")
    finally:
        portal.stop()
    assert response.status_code == 201, response.text
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert response.json()["sha256"] == digest
    assert ModelVersion.objects.get().size_bytes == path.stat().st_size
    growth_kib = peak_kib - before_kib
    print(f"upload {path.stat().st_size / 2**20:.0f} MiB: portal RSS {before_kib / 1024:.0f} MiB"
          f" -> peak {peak_kib / 1024:.0f} MiB (+{growth_kib / 1024:.1f} MiB)")
    assert growth_kib < MEMORY_BUDGET_KIB, f"portal memory grew by {growth_kib} KiB"
