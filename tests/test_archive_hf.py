"""hf_causal_lm archives: the inspector's refusals, and uploads through the registry API.

The tiny demo model (registry/demo_lm.py) is the acceptable archive; each refused one is
that archive with one thing changed: a pickle next to the weights, a config asking for
remote code, a link, a corrupt safetensors header, a missing tokenizer.
"""

from __future__ import annotations

import ast
import io
import json
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from registry.demo_lm import cached_tiny_lm_archive
from registry.models import ModelVersion
from swarm_protocol.archive import ArchiveRefused, inspect_archive

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
