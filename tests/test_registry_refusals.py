"""Every refused upload answers 4xx JSON and leaves nothing behind."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from registry.models import ModelVersion
from tests.factories import SIGNATURE

pytestmark = pytest.mark.django_db(transaction=True)


def upload_bytes(client, model_name: str, content: bytes, signature=SIGNATURE, **fields):
    from django.core.files.uploadedfile import SimpleUploadedFile

    data = {"artifact": SimpleUploadedFile("model.pt", content),
            "signature": signature if isinstance(signature, str) else json.dumps(signature),
            **fields}
    return client.post(f"/api/models/{model_name}/versions/", data, format="multipart")


def assert_refused(response, status: int, fragment: str, store) -> None:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    assert fragment in response.json()["error"], response.json()
    assert ModelVersion.objects.count() == 0
    assert store.stored_names() == set()
    assert store.staging_names() == set()


def signature_with_output(**changes) -> dict:
    output = {**SIGNATURE["outputs"][0], **changes}
    return {"inputs": SIGNATURE["inputs"], "outputs": [output]}


def test_a_text_file_is_refused(operator_api, model, store):
    response = upload_bytes(operator_api, model.name, b"hello, I am not a model\n" * 10)
    assert_refused(response, 400, "not a TorchScript or torch.export archive", store)


def test_a_zip_that_is_no_model_is_refused(operator_api, model, store, tmp_path: Path):
    path = tmp_path / "x.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "just text")
    response = upload_bytes(operator_api, model.name, path.read_bytes())
    assert_refused(response, 400, "neither a TorchScript module nor a torch.export", store)


def test_a_truncated_archive_is_refused(operator_api, model, model_files, store):
    content = model_files["torchscript"].read_bytes()
    response = upload_bytes(operator_api, model.name, content[: len(content) // 2])
    assert_refused(response, 400, "archive", store)


def test_a_corrupted_archive_is_refused(operator_api, model, model_files, store):
    content = bytearray(model_files["torchscript"].read_bytes())
    middle = len(content) // 3
    content[middle:middle + 400] = b"\xff" * 400
    response = upload_bytes(operator_api, model.name, bytes(content))
    assert response.status_code == 400, response.content
    assert ModelVersion.objects.count() == 0
    assert store.stored_names() == set()


@pytest.mark.parametrize(
    ("signature", "fragment"),
    [
        (signature_with_output(shape=[-1, 7]), "has shape [1, 3]"),
        (signature_with_output(datatype="FP64"), "is FP32, the signature says FP64"),
        ({"inputs": SIGNATURE["inputs"],
          "outputs": [*SIGNATURE["outputs"], {"name": "extra", "datatype": "FP32", "shape": [1]}]},
         "returned 1 outputs but the signature declares 2"),
        ({"inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 9]}],
          "outputs": SIGNATURE["outputs"]}, "forward pass on zeros"),
    ],
    ids=["output-shape", "output-datatype", "output-count", "input-shape"],
)
def test_a_model_that_does_not_match_its_signature_is_refused(
        operator_api, model, model_files, store, signature, fragment):
    response = upload_bytes(operator_api, model.name, model_files["torchscript"].read_bytes(),
                            signature=signature)
    assert_refused(response, 400, fragment, store)


@pytest.mark.parametrize(
    ("signature", "fragment"),
    [
        ("{not json", "signature is not valid JSON"),
        ({"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [-1, 4]}],
          "outputs": SIGNATURE["outputs"]}, "datatype must be one of"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [0, 4]}],
          "outputs": SIGNATURE["outputs"]}, "positive integers or -1"),
        ({"inputs": []}, "inputs must be a list of 1 to"),
        (None, "a TorchScript file does not state its signature"),
    ],
    ids=["malformed-json", "unknown-datatype", "zero-dim", "empty-inputs", "missing"],
)
def test_a_malformed_signature_is_refused(operator_api, model, model_files, store, signature,
                                          fragment):
    content = model_files["torchscript"].read_bytes()
    if signature is None:
        from django.core.files.uploadedfile import SimpleUploadedFile

        response = operator_api.post(f"/api/models/{model.name}/versions/",
                                     {"artifact": SimpleUploadedFile("m.pt", content)},
                                     format="multipart")
    else:
        response = upload_bytes(operator_api, model.name, content, signature=signature)
    assert_refused(response, 400, fragment, store)


def test_metadata_must_be_an_object(operator_api, model, model_files, store):
    response = upload_bytes(operator_api, model.name, model_files["torchscript"].read_bytes(),
                            metadata="[1, 2]")
    assert_refused(response, 400, "metadata must be a JSON object", store)


def test_a_declared_format_that_differs_is_refused(operator_api, model, model_files, store):
    response = upload_bytes(operator_api, model.name, model_files["torchscript"].read_bytes(),
                            format="torch_export")
    assert_refused(response, 400, "is a torchscript archive, not torch_export", store)


def test_a_missing_artifact_is_refused(operator_api, model, store):
    response = operator_api.post(f"/api/models/{model.name}/versions/",
                                 {"signature": json.dumps(SIGNATURE)}, format="multipart")
    assert_refused(response, 400, "'artifact'", store)


def test_an_upload_over_the_limit_answers_413(operator_api, model, model_files, store, settings):
    content = model_files["torchscript"].read_bytes()
    settings.MAX_UPLOAD_BYTES = len(content) - 1
    response = upload_bytes(operator_api, model.name, content)
    assert_refused(response, 413, "MAX_UPLOAD_BYTES", store)


def test_a_model_that_runs_too_long_times_out(operator_api, model, store, settings,
                                              tmp_path: Path):
    import torch

    class Spin(torch.nn.Module):
        def forward(self, features: torch.Tensor) -> torch.Tensor:
            total = features.sum()
            for _ in range(1_000_000_000):
                total = total + 1.0
            return features[:, :3] * total

    path = tmp_path / "spin.pt"
    torch.jit.save(torch.jit.script(Spin()), str(path))
    settings.VALIDATION_TIMEOUT_S = 6.0
    response = upload_bytes(operator_api, model.name, path.read_bytes())
    assert_refused(response, 400, "validation timed out", store)


def test_a_model_over_the_memory_limit_is_refused(operator_api, model, store, settings,
                                                  tmp_path: Path):
    import torch

    class Hog(torch.nn.Module):
        def forward(self, features: torch.Tensor) -> torch.Tensor:
            big = torch.ones(64, 1024, 1024, 1024, dtype=torch.uint8)  # 64 GiB
            return features[:, :3] + big.sum().float()

    path = tmp_path / "hog.pt"
    torch.jit.save(torch.jit.script(Hog()), str(path))
    settings.VALIDATION_MEMORY_BYTES = 4 * 1024**3
    response = upload_bytes(operator_api, model.name, path.read_bytes())
    assert_refused(response, 400, "memory", store)
