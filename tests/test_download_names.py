"""Downloads are named by format: an hf_causal_lm archive by its container, not `.pt`."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
import zipfile

import pytest

from registry.downloads import HEAD_BYTES, download_suffix


def tar_bytes() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("model/config.json")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"{}"))
    return buffer.getvalue()


def zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model/config.json", "{}")
    return buffer.getvalue()


@pytest.mark.parametrize(("container", "suffix"), [
    (tar_bytes(), "tar"), (gzip.compress(tar_bytes()), "tar.gz"),
    (bz2.compress(tar_bytes()), "tar.bz2"), (lzma.compress(tar_bytes()), "tar.xz"),
    (zip_bytes(), "zip")])
def test_an_hf_archive_is_named_by_its_container(container, suffix):
    # Each compressed form is what tarfile opens (the inspector accepts any of them).
    if suffix.startswith("tar"):
        with tarfile.open(fileobj=io.BytesIO(container)) as archive:
            assert archive.getnames() == ["model/config.json"]
    assert download_suffix("hf_causal_lm", container[:HEAD_BYTES]) == suffix


@pytest.mark.parametrize(("model_format", "suffix"), [
    ("torchscript", "pt"), ("torch_export", "pt2"), ("onnx", "onnx"), ("future_format", "bin")])
def test_other_formats_are_named_by_format(model_format, suffix):
    assert download_suffix(model_format, b"PK\x03\x04rest") == suffix
