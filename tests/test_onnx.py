"""ONNX models end to end, and signatures read from the file for every format.

Uploads go over REST through the real validation child (ONNX Runtime inside it); the
serving tests start a real replica process and a real standalone gateway.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from registry.demo import DEMO_SIGNATURE
from swarm_protocol.archive import ArchiveRefused, inspect_archive
from tests import onnx_models
from tests.onnx_models import ONNX_SIGNATURE, expected_scores
from tests.test_registry_refusals import assert_refused

db = pytest.mark.django_db(transaction=True)
TORCH_MLP_INPUT = [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]


def upload(client, model_name: str, path: Path, signature=None, **fields):
    """POST a version; `signature` None leaves the field out (the file's is used)."""
    with path.open("rb") as handle:
        data = {"artifact": handle, **fields}
        if signature is not None:
            data["signature"] = json.dumps(signature)
        return client.post(f"/api/models/{model_name}/versions/", data, format="multipart")


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    return onnx_models.mlp_onnx(tmp_path_factory.mktemp("onnx") / "mlp.onnx")


# --- the inspector (no Django, no child) ---------------------------------------------------

@pytest.mark.parametrize(("build", "fragment"), [
    (onnx_models.with_external_data, "refers to external data ('../../../etc/passwd')"),
    (onnx_models.with_custom_domain, "custom operator domain 'com.example.native'"),
    (onnx_models.with_huge_constant, "brings the declared weights above"),
    (onnx_models.with_ep_context, "which loads a file by path"),
], ids=["external-data", "custom-domain", "huge-constant", "ep-context"])
def test_the_inspector_refuses_what_onnx_runtime_would_load_from_elsewhere(tmp_path, build,
                                                                          fragment):
    path = build(tmp_path / "hostile.onnx")
    with pytest.raises(ArchiveRefused, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        inspect_archive(str(path))


def test_the_inspector_finds_onnx_without_being_told_and_records_opset(onnx_file):
    inspected = inspect_archive(str(onnx_file))
    assert inspected.format == "onnx"
    assert inspected.onnx is not None
    assert (inspected.onnx.opset, inspected.onnx.producer) == (17, "swarm-tests 1.0")


def test_a_declared_onnx_zip_and_a_declared_torchscript_onnx_are_refused(onnx_file,
                                                                         model_files):
    with pytest.raises(ArchiveRefused, match="not an ONNX model"):
        inspect_archive(str(model_files["torchscript"]), declared_format="onnx")
    with pytest.raises(ArchiveRefused, match="as the format torchscript needs"):
        inspect_archive(str(onnx_file), declared_format="torchscript")


def test_the_session_loader_takes_only_what_the_inspector_returned(onnx_file):
    from swarm_protocol.archive import InspectedArchive
    from swarm_protocol.model_loading import load_onnx_session

    with pytest.raises(TypeError, match="inspect_archive"):
        load_onnx_session(InspectedArchive(str(onnx_file), "onnx", "", 1))
    session = load_onnx_session(inspect_archive(str(onnx_file)), "cpu", 2)
    assert session.get_providers() == ["CPUExecutionProvider"]


@pytest.mark.parametrize(("device", "available", "expected"), [
    ("cuda:1", ["CUDAExecutionProvider", "CPUExecutionProvider", "AzureExecutionProvider"],
     [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]),
    ("cuda", ["AzureExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
    ("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
], ids=["cuda-built-in", "cuda-missing", "cpu"])
def test_providers_are_cuda_where_asked_and_built_in_else_cpu_never_azure(device, available,
                                                                          expected):
    from swarm_protocol.model_loading import onnx_providers

    assert onnx_providers(device, available) == expected


# --- uploads over REST -------------------------------------------------------------------

@db
def test_an_onnx_upload_without_a_signature_gets_the_graphs(operator_api, model, onnx_file):
    response = upload(operator_api, model.name, onnx_file)
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["format"], body["platform"]) == ("onnx", "onnxruntime_onnx")
    assert body["signature"] == ONNX_SIGNATURE  # the symbolic batch dimension reads -1
    assert body["artifact_info"] == {"opset": 17, "producer": "swarm-tests 1.0",
                                     "signature_inferred": True}


@db
def test_a_fixed_batch_dimension_stays_fixed(operator_api, model, tmp_path):
    path = onnx_models.save(onnx_models.mlp_model(batch=2), tmp_path / "fixed.onnx")
    response = upload(operator_api, model.name, path)
    assert response.status_code == 201, response.content
    assert response.json()["signature"]["inputs"][0]["shape"] == [2, 4]


@db
def test_a_matching_declared_signature_is_kept(operator_api, model, onnx_file):
    narrower = json.loads(json.dumps(ONNX_SIGNATURE))
    narrower["inputs"][0]["shape"] = [8, 4]  # a fixed size where the graph says -1 is fine
    narrower["outputs"][0]["shape"] = [8, 3]
    response = upload(operator_api, model.name, onnx_file, narrower, format="onnx")
    assert response.status_code == 201, response.content
    assert response.json()["signature"] == narrower
    assert response.json()["artifact_info"]["signature_inferred"] is False


def _declared(kind: str, **changes) -> dict:
    signature = json.loads(json.dumps(ONNX_SIGNATURE))
    signature[kind][0].update(changes)
    return signature


@db
@pytest.mark.parametrize(("signature", "fragment"), [
    (_declared("inputs", name="x"), "input 'x': the model's input at that position is "
                                    "'features'"),
    (_declared("outputs", datatype="FP64"), "output 'scores' is declared FP64, the model's "
                                            "is FP32"),
    (_declared("outputs", shape=[-1, 7]), "output 'scores' is declared with shape [-1, 7]"),
    ({"inputs": ONNX_SIGNATURE["inputs"],
      "outputs": [*ONNX_SIGNATURE["outputs"], {"name": "extra", "datatype": "FP32",
                                               "shape": [1]}]}, "declares 2 outputs"),
], ids=["input-name", "output-datatype", "output-shape", "output-count"])
def test_a_declared_signature_that_contradicts_the_graph_is_refused(
        operator_api, model, onnx_file, store, signature, fragment):
    response = upload(operator_api, model.name, onnx_file, signature)
    assert_refused(response, 400, fragment, store)


@db
@pytest.mark.parametrize(("build", "fragment"), [
    (onnx_models.with_external_data, "refers to external data"),
    (onnx_models.with_custom_domain, "needs a shared library"),
    (onnx_models.with_huge_constant, "brings the declared weights above"),
], ids=["external-data", "custom-domain", "huge-constant"])
def test_hostile_onnx_uploads_are_refused(operator_api, model, store, tmp_path, build,
                                          fragment):
    response = upload(operator_api, model.name, build(tmp_path / "hostile.onnx"))
    assert_refused(response, 400, fragment, store)


@db
def test_a_corrupt_onnx_file_is_refused(operator_api, model, store, onnx_file, tmp_path):
    path = tmp_path / "cut.onnx"
    path.write_bytes(onnx_file.read_bytes()[:300])
    declared = upload(operator_api, model.name, path, format="onnx")
    assert_refused(declared, 400, "the file is not an ONNX model", store)
    detected = upload(operator_api, model.name, path)
    assert_refused(detected, 400, "nor an ONNX model", store)


@db
def test_an_onnx_file_over_the_size_limit_is_refused(operator_api, model, store, onnx_file,
                                                     settings):
    settings.ARCHIVE_MAX_UNCOMPRESSED_BYTES = onnx_file.stat().st_size - 1
    response = upload(operator_api, model.name, onnx_file)
    assert_refused(response, 400, "the ONNX file is larger than", store)


@db
def test_the_version_page_shows_opset_producer_and_inferred_signature(
        client, operator, operator_api, model, onnx_file):
    assert upload(operator_api, model.name, onnx_file).status_code == 201
    client.force_login(operator)
    page = client.get(f"/models/{model.name}/").content.decode()
    assert "ONNX opset 17" in page and "swarm-tests 1.0" in page
    assert "Signature read from the file." in page


# --- signatures read from torch files ------------------------------------------------------

@db
def test_a_torch_export_upload_without_a_signature_gets_its_example_shapes(
        operator_api, model, model_files):
    response = upload(operator_api, model.name, model_files["torch_export"])
    assert response.status_code == 201, response.content
    assert response.json()["signature"] == {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "output_0", "datatype": "FP32", "shape": [-1, 3]}]}
    assert response.json()["artifact_info"] == {"signature_inferred": True}


@db
def test_a_torch_export_declared_signature_is_checked_by_position(operator_api, model,
                                                                  model_files, store):
    wrong = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 5]}],
             "outputs": DEMO_SIGNATURE["outputs"]}
    refused = upload(operator_api, model.name, model_files["torch_export"], wrong)
    assert_refused(refused, 400, "input 'features' is declared with shape [-1, 5], the "
                                 "model's is [-1, 4]", store)
    kept = upload(operator_api, model.name, model_files["torch_export"], DEMO_SIGNATURE)
    assert kept.status_code == 201, kept.content  # other names: torch binds by position
    assert kept.json()["signature"] == DEMO_SIGNATURE


@db
def test_torchscript_declared_signature_is_checked_against_its_example(operator_api, model,
                                                                       model_files, store):
    wrong = {"inputs": TORCH_MLP_INPUT,
             "outputs": [{"name": "scores", "datatype": "INT64", "shape": [-1, 3]}]}
    response = upload(operator_api, model.name, model_files["torchscript"], wrong,
                      example_input=json.dumps(TORCH_MLP_INPUT))
    assert_refused(response, 400, "output 'scores' is declared INT64, the model's is FP32",
                   store)


@db
def test_torchscript_needs_a_signature_or_an_example_input(operator_api, model, model_files,
                                                           store):
    response = upload(operator_api, model.name, model_files["torchscript"])
    assert_refused(response, 400, "give a signature or an example_input", store)


@db
def test_torchscript_with_an_example_input_gets_observed_outputs(operator_api, model,
                                                                 model_files):
    response = upload(operator_api, model.name, model_files["torchscript"],
                      example_input=json.dumps(TORCH_MLP_INPUT))
    assert response.status_code == 201, response.content
    assert response.json()["signature"] == {
        "inputs": TORCH_MLP_INPUT,
        "outputs": [{"name": "output_0", "datatype": "FP32", "shape": [-1, 3]}]}


@db
def test_a_malformed_example_input_is_refused_before_any_child(operator_api, model,
                                                               model_files, store):
    response = upload(operator_api, model.name, model_files["torchscript"],
                      example_input=json.dumps({"x": 1}))
    assert_refused(response, 400, "example_input must be a list", store)


# --- serving -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_replica(onnx_file, tmp_path_factory) -> Iterator:
    from tests.replica_models import start_replica

    directory = tmp_path_factory.mktemp("replica-onnx")
    process = start_replica(directory, onnx_file, "onnx", ONNX_SIGNATURE, name="mlp-onnx",
                            max_batch_size=8, max_queue_delay_ms=5.0)
    yield process
    process.stop()


def rows_of(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, 4)).astype(np.float32)


def json_request(rows: np.ndarray) -> dict:
    return {"inputs": [{"name": "features", "datatype": "FP32", "shape": list(rows.shape),
                        "data": rows.flatten().tolist()}]}


def scores(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    return np.array(output["data"], dtype=np.float32).reshape(output["shape"])


@pytest.mark.slow
def test_a_replica_serves_onnx_in_json_and_binary(onnx_replica):
    rows = rows_of(5, seed=1)
    header = json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [5, 4],
                                     "parameters": {"binary_data_size": rows.nbytes}}],
                         "outputs": [{"name": "scores",
                                      "parameters": {"binary_data": True}}]}).encode()
    with onnx_replica.client() as client:
        metadata = client.get("/v2/models/mlp-onnx").json()
        as_json = scores(client.post("/v2/models/mlp-onnx/infer", json=json_request(rows)))
        binary = client.post("/v2/models/mlp-onnx/infer", content=header + rows.tobytes(),
                             headers={"Inference-Header-Content-Length": str(len(header))})
    assert metadata["platform"] == "onnxruntime_onnx"
    np.testing.assert_allclose(as_json, expected_scores(rows), rtol=1e-5, atol=1e-6)
    length = int(binary.headers["Inference-Header-Content-Length"])
    values = np.frombuffer(binary.content[length:], dtype=np.float32).reshape(5, 3)
    np.testing.assert_allclose(values, expected_scores(rows), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_batched_rows_give_the_same_numbers_as_one_by_one(onnx_replica):
    import asyncio

    import httpx

    from tests.replica_models import AUTH

    rows = rows_of(8, seed=2)
    with onnx_replica.client() as client:
        one_by_one = np.concatenate([
            scores(client.post("/v2/models/mlp-onnx/infer", json=json_request(rows[i:i + 1])))
            for i in range(len(rows))])
        one_request = scores(client.post("/v2/models/mlp-onnx/infer", json=json_request(rows)))

    async def together() -> list[np.ndarray]:
        # Concurrent single rows: the engine may stack them into one ONNX Runtime run.
        async with httpx.AsyncClient(base_url=onnx_replica.url, headers=AUTH) as client:
            responses = await asyncio.gather(*(
                client.post("/v2/models/mlp-onnx/infer", json=json_request(rows[i:i + 1]))
                for i in range(len(rows))))
        return [scores(response) for response in responses]

    concurrent = np.concatenate(asyncio.run(together()))
    np.testing.assert_allclose(one_by_one, expected_scores(rows), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one_request, one_by_one, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(concurrent, one_by_one, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_tritonclient_reaches_the_onnx_replica_through_the_gateway(onnx_replica, tmp_path):
    import tritonclient.http as triton

    from serving.gateway.filesource import write_table
    from serving.gateway.routes import VersionInfo
    from tests.gateway_helpers import BEARER, StandaloneGateway, deployment, replica_route, table

    info = VersionInfo("onnxruntime_onnx", ONNX_SIGNATURE["inputs"], ONNX_SIGNATURE["outputs"])
    table_path = tmp_path / "table.json"
    write_table(table_path, table(deployment("mlp-onnx", [replica_route(onnx_replica, 1)],
                                             info=info)))
    gateway = StandaloneGateway(table_path)
    client = triton.InferenceServerClient(url=f"127.0.0.1:{gateway.port}")
    try:
        rows = rows_of(3, seed=3)
        features = triton.InferInput("features", [3, 4], "FP32")
        features.set_data_from_numpy(rows, binary_data=True)
        result = client.infer("mlp-onnx", [features], headers=dict(BEARER))
        metadata = client.get_model_metadata("mlp-onnx", headers=dict(BEARER))
    finally:
        client.close()
        gateway.stop()
    np.testing.assert_allclose(result.as_numpy("scores"), expected_scores(rows), rtol=1e-5,
                               atol=1e-6)
    assert metadata["platform"] == "onnxruntime_onnx"
