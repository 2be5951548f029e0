"""hf_causal_lm archives: the inspector's refusals, and uploads through the registry API.

The tiny demo model (registry/demo_lm.py) is the acceptable archive; each refused one is
that archive with one thing changed: a pickle next to the weights, a config asking for
remote code, a link, a corrupt safetensors header, a missing tokenizer.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from registry.demo_lm import cached_tiny_lm_archive
from registry.models import ModelVersion
from swarm_protocol.archive import ArchiveLimits, ArchiveRefused, inspect_archive

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    return cached_tiny_lm_archive(tmp_path_factory.mktemp("tiny-lm"))


def members(archive_path: Path) -> dict[str, bytes]:
    with tarfile.open(archive_path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}


def write_tar(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return path


def changed(tiny_lm: Path, tmp_path: Path, **edits: bytes | None) -> Path:
    files = members(tiny_lm)
    for name, data in edits.items():
        key = f"tiny-lm/{name.replace('__', '.')}"
        if data is None:
            files.pop(key)
        else:
            files[key] = data
    return write_tar(tmp_path / "edited.tar.gz", files)


def test_the_tiny_model_passes_with_its_metadata(tiny_lm):
    archive = inspect_archive(str(tiny_lm))
    assert archive.format == "hf_causal_lm"
    assert archive.hf is not None
    metadata = archive.hf.metadata()
    assert metadata["context_tokens"] == 512 and metadata["vocab_size"] == 384
    assert metadata["dtype"] == "F32" and metadata["parameter_count"] > 100_000
    assert metadata["chat_template"] is True


def test_the_tiny_model_build_is_deterministic(tiny_lm, tmp_path):
    again = cached_tiny_lm_archive(tmp_path)
    assert again.read_bytes() == tiny_lm.read_bytes()


def test_a_zip_of_the_same_files_passes(tiny_lm, tmp_path):
    path = tmp_path / "model.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members(tiny_lm).items():
            archive.writestr(name.split("/")[-1], data)  # flat: no top folder
    assert inspect_archive(str(path)).format == "hf_causal_lm"


@pytest.mark.parametrize(("edits", "fragment"), [
    ({"pytorch_model__bin": b"\x80\x04pickle"}, "pickled weights and code are refused"),
    ({"modeling_evil__py": b"import os"}, "pickled weights and code are refused"),
    ({"notes__txt": b"hello"}, "unexpected file"),
    ({"tokenizer__json": None}, "no tokenizer.json"),
    ({"model__safetensors": None}, "no model.safetensors"),
    ({"model__safetensors": struct.pack("<Q", 10**12) + b"{}"}, "not a safetensors file"),
    ({"config__json": b"{not json"}, "config.json is not valid JSON"),
    ({"config__json": json.dumps({"model_type": "llama", "auto_map": {
        "AutoModelForCausalLM": "modeling_evil.Evil"}}).encode()}, "trust_remote_code"),
    ({"tokenizer_config__json": json.dumps({"auto_map": {}}).encode()}, "trust_remote_code"),
    ({"config__json": json.dumps({"model_type": "bert",
                                  "architectures": ["BertModel"]}).encode()}, "causal"),
])
def test_refused_archives_name_the_reason(tiny_lm, tmp_path, edits, fragment):
    with pytest.raises(ArchiveRefused, match=fragment):
        inspect_archive(str(changed(tiny_lm, tmp_path, **edits)), declared_format="hf_causal_lm")


def test_a_safetensors_header_with_wrong_offsets_is_refused(tiny_lm, tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}})
    weights = struct.pack("<Q", len(header)) + header.encode() + bytes(64)
    path = changed(tiny_lm, tmp_path, model__safetensors=weights)
    with pytest.raises(ArchiveRefused, match="do not match"):
        inspect_archive(str(path))


@pytest.mark.parametrize("name", ["../config.json", "/abs/config.json", "a/b/config.json"])
def test_paths_outside_one_folder_are_refused(tiny_lm, tmp_path, name):
    files = {**members(tiny_lm)}
    files = {f"x/{n.split('/')[-1]}": data for n, data in files.items()} if "a/b" in name \
        else files
    files[name] = b"{}"
    with pytest.raises(ArchiveRefused):
        inspect_archive(str(write_tar(tmp_path / "p.tar.gz", files)),
                        declared_format="hf_causal_lm")


def test_a_symbolic_link_is_refused(tiny_lm, tmp_path):
    path = write_tar(tmp_path / "l.tar.gz", members(tiny_lm),
                     links={"tiny-lm/generation_config.json": "/etc/passwd"})
    with pytest.raises(ArchiveRefused, match="link"):
        inspect_archive(str(path))


def test_only_the_model_loader_calls_from_pretrained():
    callers = sorted(
        str(path.relative_to(ROOT))
        for folder in ("swarm_protocol", "registry", "serving", "scaling", "bench")
        for path in (ROOT / folder).rglob("*.py")
        if any(isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
               and node.func.attr in ("from_pretrained", "load_file", "safe_open")
               for node in ast.walk(ast.parse(path.read_text()))))
    assert callers == ["swarm_protocol/model_loading.py"]


# Uploads through the registry API (the validation child loads the model for real).

def upload(client, model_name: str, content: bytes, **fields):
    from django.core.files.uploadedfile import SimpleUploadedFile

    data = {"artifact": SimpleUploadedFile("model.tar", content), **fields}
    return client.post(f"/api/models/{model_name}/versions/", data, format="multipart")


@pytest.mark.django_db(transaction=True)
def test_the_tiny_model_uploads_with_its_signature_and_metadata(operator_api, model, tiny_lm):
    response = upload(operator_api, model.name, tiny_lm.read_bytes(), format="hf_causal_lm")
    assert response.status_code == 201, response.content
    version = ModelVersion.objects.get()
    assert version.format == "hf_causal_lm"
    assert version.platform == "transformers_causal_lm"
    assert version.signature["inputs"][0]["name"] == "text_input"
    assert version.artifact_info["vocab_size"] == 384
    assert version.artifact_info["context_tokens"] == 512


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("edits", "fragment"), [
    ({"pytorch_model__bin": b"\x80\x04pickle"}, "pickled weights"),
    ({"model__safetensors": b"garbage"}, "safetensors"),
])
def test_a_bad_archive_upload_is_refused_with_400_json(operator_api, model, tiny_lm,
                                                      tmp_path, store, edits, fragment):
    content = changed(tiny_lm, tmp_path, **edits).read_bytes()
    response = upload(operator_api, model.name, content)
    assert response.status_code == 400, response.content
    assert response["Content-Type"].startswith("application/json")
    assert fragment in response.json()["error"]
    assert ModelVersion.objects.count() == 0
    assert store.stored_names() == set()


@pytest.mark.django_db(transaction=True)
def test_the_upload_form_takes_the_tiny_model(client, operator, model, tiny_lm):
    from django.core.files.uploadedfile import SimpleUploadedFile

    client.force_login(operator)
    page = client.get(f"/models/{model.name}/upload/")
    assert b"hf_causal_lm" in page.content  # offered as a format
    data = {"artifact": SimpleUploadedFile("tiny-lm.tar", tiny_lm.read_bytes()),
            "signature": "", "metadata": "", "format": "hf_causal_lm"}
    response = client.post(f"/models/{model.name}/upload/", data, follow=True)
    assert response.redirect_chain[-1][0] == f"/models/{model.name}/"
    assert ModelVersion.objects.get().format == "hf_causal_lm"


def test_a_tar_made_with_dot_names_passes_and_loads(tiny_lm, tmp_path):
    # `tar -C folder -czf model.tgz .` writes "./" and "./config.json"
    from swarm_protocol.model_loading import load_causal_lm

    files = {f"./{name.split('/')[-1]}": data for name, data in members(tiny_lm).items()}
    path = tmp_path / "dots.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        folder = tarfile.TarInfo("./")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    checked = inspect_archive(str(path))
    model, tokenizer = load_causal_lm(checked)
    assert model.config.vocab_size == 384 and len(tokenizer) <= 384


# Compressed tar bombs: refused from the headers, in one forward pass, without inflating.

def gzip_bomb(path: Path, header: bytes, zeros_bytes: int) -> Path:
    """Write a gzip of `header` then `zeros_bytes` zeros, cheaply: gzip members repeated."""
    chunk_bytes = 64 * 1024**2
    zeros = gzip.compress(bytes(chunk_bytes), compresslevel=9)
    with path.open("wb") as handle:
        handle.write(gzip.compress(header))
        for _ in range(zeros_bytes // chunk_bytes):
            handle.write(zeros)  # a gzip stream may be several members, read as one
    return path


def tar_header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(tarfile.GNU_FORMAT)


def test_a_compressed_tar_bomb_is_refused_by_the_ratio_limit_in_little_cpu(tmp_path):
    bomb = gzip_bomb(tmp_path / "bomb.tar.gz",
                     tar_header("tiny-lm/model.safetensors", 3 * 1024**3), 3 * 1024**3)
    assert bomb.stat().st_size < 8 * 1024**2  # a few MB that declare 3 GiB
    limits = ArchiveLimits(max_uncompressed_bytes=8 * 1024**3)  # the portal's default
    started_s = time.process_time()
    with pytest.raises(ArchiveRefused, match="ARCHIVE_MAX_RATIO") as refused:
        inspect_archive(str(bomb), limits, declared_format="hf_causal_lm")
    assert time.process_time() - started_s < 1.0
    assert "200 times" in str(refused.value)


def test_members_whose_declared_sizes_add_up_past_the_limit_are_refused_early(tmp_path):
    header = b"".join(tar_header(f"m/{n}", 1024**2) + bytes(1024**2) for n in
                      ("config.json", "tokenizer.json", "model.safetensors"))
    path = tmp_path / "sum.tar"
    path.write_bytes(header)  # plain tar: only the total limit applies
    with pytest.raises(ArchiveRefused, match=r"more than 2500000 bytes \(ARCHIVE_MAX_UNCOMP"):
        inspect_archive(str(path), ArchiveLimits(max_uncompressed_bytes=2_500_000),
                        declared_format="hf_causal_lm")


def test_a_tar_inflating_more_than_it_declares_is_refused_in_little_cpu(tmp_path):
    # A pax header is read whole by tarfile and counted in no member's size.
    bomb = gzip_bomb(tmp_path / "pax.tar.gz",
                     tar_header("././@PaxHeader", 512 * 1024**2, tarfile.XHDTYPE),
                     512 * 1024**2)
    started_s = time.process_time()
    with pytest.raises(ArchiveRefused, match="inflates to more than its members declare"):
        inspect_archive(str(bomb), declared_format="hf_causal_lm")
    assert time.process_time() - started_s < 1.0


@pytest.mark.django_db(transaction=True)
def test_an_uploaded_tar_bomb_is_a_400_naming_the_limit(operator_api, model, tmp_path, store):
    bomb = gzip_bomb(tmp_path / "bomb.tar.gz",
                     tar_header("tiny-lm/model.safetensors", 3 * 1024**3), 3 * 1024**3)
    started_s = time.monotonic()
    response = upload(operator_api, model.name, bomb.read_bytes())
    assert response.status_code == 400, response.content
    assert "ARCHIVE_MAX_RATIO" in response.json()["error"]
    assert time.monotonic() - started_s < 5.0  # it was 12 s, inflating 3 GiB twice
    assert ModelVersion.objects.count() == 0 and store.stored_names() == set()


def test_the_demo_lm_module_writes_the_archive_to_upload(tiny_lm, tmp_path):
    out = tmp_path / "my-lm.tar"
    result = subprocess.run([sys.executable, "-m", "registry.demo_lm", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == tiny_lm.read_bytes()  # the same deterministic build
    assert inspect_archive(str(out)).format == "hf_causal_lm"
    assert f"wrote {out}" in result.stdout
    assert not list(tmp_path.glob(".my-lm.tar.*"))  # no partial file left


@pytest.mark.parametrize("argv", [[], ["/no/such/folder/out.tar"]])
def test_the_demo_lm_module_prints_its_usage_on_bad_arguments(argv):
    result = subprocess.run([sys.executable, "-m", "registry.demo_lm", *argv], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "usage: python -m registry.demo_lm" in result.stderr
