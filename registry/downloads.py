"""Stream an artifact to an authenticated caller, with its sha256 in a header.

An async view with an async iterator: under ASGI, Django would otherwise read a
synchronous iterator into memory whole, which a multi-GB artifact must not do.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from django.http import HttpRequest, HttpResponseBase, JsonResponse, StreamingHttpResponse

from registry.models import ModelVersion
from registry.services import artifact_store
from registry.storage import CHUNK_BYTES
from swarm_portal.auth import authenticate_async

SHA256_HEADER = "X-Artifact-SHA256"
# The file name's extension per format; hf_causal_lm's depends on the archive (below).
FORMAT_SUFFIXES = {"torchscript": "pt", "torch_export": "pt2", "onnx": "onnx"}
# Magic bytes of the containers an hf_causal_lm upload may be (any tar compression, or zip).
ARCHIVE_MAGIC = ((b"PK\x03\x04", "zip"), (b"\x1f\x8b", "tar.gz"), (b"BZh", "tar.bz2"),
                 (b"\xfd7zXZ\x00", "tar.xz"))
HEAD_BYTES = 8


def download_suffix(model_format: str, head: bytes) -> str:
    """Return the download's extension (no dot) for a version of `model_format` whose file
    starts with `head` (its first HEAD_BYTES bytes): an archive is named by its container,
    so that tools which go by the name (tar, unzip, a file manager) open it."""
    if model_format in FORMAT_SUFFIXES:
        return FORMAT_SUFFIXES[model_format]
    if model_format == "hf_causal_lm":
        return next((suffix for magic, suffix in ARCHIVE_MAGIC if head.startswith(magic)),
                    "tar")
    return "bin"  # a format this code does not know yet: no misleading name


async def read_head(path: str) -> bytes:
    """Return the first HEAD_BYTES bytes of the file at `path`."""
    def read() -> bytes:
        with open(path, "rb") as handle:
            return handle.read(HEAD_BYTES)
    return await asyncio.to_thread(read)


async def read_chunks(path: str) -> AsyncIterator[bytes]:
    handle = await asyncio.to_thread(open, path, "rb")
    try:
        while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
            yield chunk
    finally:
        handle.close()


async def artifact_download(request: HttpRequest, model_name: str, number: int
                            ) -> HttpResponseBase:
    """Return the version's artifact as a stream, sha256 and size in the headers."""
    if request.method not in ("GET", "HEAD"):
        return JsonResponse({"error": "method not allowed"}, status=405)
    if await authenticate_async(request) is None:
        return JsonResponse({"error": "authentication credentials were not provided"},
                            status=401, headers={"WWW-Authenticate": "Token"})
    version = await (ModelVersion.objects.select_related("model")
                     .filter(model__name=model_name, number=number).afirst())
    if version is None:
        return JsonResponse({"error": f"{model_name} has no version {number}"}, status=404)
    path = artifact_store().path(version.artifact_name)
    content = read_chunks(str(path)) if request.method == "GET" else _empty()
    response = StreamingHttpResponse(content, content_type="application/octet-stream")
    response[SHA256_HEADER] = version.sha256
    response["Content-Length"] = str(version.size_bytes)
    head = await read_head(str(path)) if version.format == "hf_causal_lm" else b""
    suffix = download_suffix(version.format, head)
    response["Content-Disposition"] = (
        f'attachment; filename="{version.model.name}-v{version.number}.{suffix}"')
    return response


async def _empty() -> AsyncIterator[bytes]:
    return
    yield b""
