"""Real replica processes serving an image CNN (UINT8 in) and a two-output recommender,
as TorchScript and as torch.export; the recommender also through tritonclient.http."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch

from tests.replica_models import (
    AUTH,
    CNN_SIGNATURE,
    RECOMMENDER_ITEMS,
    RECOMMENDER_SIGNATURE,
    ReplicaProcess,
    build_image_cnn,
    build_recommender,
    save_torch_export,
    save_torchscript,
    start_replica,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cnn_replica(tmp_path_factory) -> Iterator[ReplicaProcess]:
    directory = tmp_path_factory.mktemp("replica-cnn")
    artifact = save_torchscript(build_image_cnn(seed=0), directory / "cnn.pt")
    process = start_replica(directory, artifact, "torchscript", CNN_SIGNATURE, name="cnn",
                            max_batch_size=4)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def recommender_replica(tmp_path_factory) -> Iterator[ReplicaProcess]:
    directory = tmp_path_factory.mktemp("replica-rec")
    artifact = save_torchscript(build_recommender(seed=0), directory / "rec.pt")
    process = start_replica(directory, artifact, "torchscript", RECOMMENDER_SIGNATURE,
                            name="rec", version=7, max_batch_size=8, max_queue_delay_ms=1.0)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def exported_replica(tmp_path_factory) -> Iterator[ReplicaProcess]:
    directory = tmp_path_factory.mktemp("replica-rec-export")
    example = (torch.randint(0, RECOMMENDER_ITEMS, (2, 8)), torch.zeros(2, 4))
    artifact = save_torch_export(build_recommender(seed=0, as_dict=True), example,
                                 directory / "rec.pt2")
    process = start_replica(directory, artifact, "torch_export", RECOMMENDER_SIGNATURE,
                            name="rec-export", version=1, max_batch_size=8)
    yield process
    process.stop()


def images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)


def expected_logits(batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return build_image_cnn(seed=0)(torch.from_numpy(batch)).numpy()


def recommender_inputs(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    item_ids = rng.integers(0, RECOMMENDER_ITEMS, (rows, 8), dtype=np.int64)
    return item_ids, rng.normal(size=(rows, 4)).astype(np.float32)


def expected_recommendation(item_ids: np.ndarray, dense: np.ndarray):
    with torch.no_grad():
        score, top = build_recommender(seed=0)(torch.from_numpy(item_ids),
                                               torch.from_numpy(dense))
    return score.numpy(), top.numpy()


def recommender_json(item_ids: np.ndarray, dense: np.ndarray, **extra) -> dict:
    rows = len(item_ids)
    return {"inputs": [
        {"name": "item_ids", "datatype": "INT64", "shape": [rows, 8], "data": item_ids.tolist()},
        {"name": "dense", "datatype": "FP32", "shape": [rows, 4], "data": dense.tolist()},
    ], **extra}


def outputs_by_name(response: httpx.Response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    return {out["name"]: np.array(out["data"]).reshape(out["shape"])
            for out in response.json()["outputs"]}


def test_cnn_takes_uint8_images_as_binary_data(cnn_replica):
    batch = images(3, seed=0)
    header = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8",
                                     "shape": [3, 3, 32, 32],
                                     "parameters": {"binary_data_size": batch.nbytes}}]}).encode()
    with cnn_replica.client() as client:
        response = client.post("/v2/models/cnn/infer", content=header + batch.tobytes(),
                               headers={"Inference-Header-Content-Length": str(len(header))})
    logits = outputs_by_name(response)["logits"]
    assert logits.shape == (3, 10)
    np.testing.assert_allclose(logits, expected_logits(batch), rtol=1e-4, atol=1e-5)


def test_cnn_takes_nested_json_uint8_and_refuses_other_datatypes(cnn_replica):
    batch = images(1, seed=1)
    request = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 3, 32, 32],
                           "data": batch.tolist()}]}
    with cnn_replica.client() as client:
        logits = outputs_by_name(client.post("/v2/models/cnn/infer", json=request))["logits"]
        np.testing.assert_allclose(logits, expected_logits(batch), rtol=1e-4, atol=1e-5)
        request["inputs"][0]["datatype"] = "FP32"
        refused = client.post("/v2/models/cnn/infer", json=request)
        request["inputs"][0].update(datatype="UINT8", data=(batch.astype(int) + 100).tolist())
        out_of_range = client.post("/v2/models/cnn/infer", json=request)
    assert refused.status_code == 400 and "expects UINT8" in refused.json()["error"]
    assert out_of_range.status_code == 400 and "[0, 255]" in out_of_range.json()["error"]


def test_recommender_returns_both_outputs(recommender_replica):
    item_ids, dense = recommender_inputs(4, seed=0)
    with recommender_replica.client() as client:
        response = client.post("/v2/models/rec/versions/7/infer",
                               json=recommender_json(item_ids, dense))
    outputs = outputs_by_name(response)
    score, top = expected_recommendation(item_ids, dense)
    np.testing.assert_allclose(outputs["score"], score, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(outputs["top_item"], top)
    assert [o["datatype"] for o in response.json()["outputs"]] == ["FP32", "INT64"]


def test_recommender_returns_only_the_requested_output_as_binary(recommender_replica):
    item_ids, dense = recommender_inputs(2, seed=1)
    request = recommender_json(item_ids, dense,
                               outputs=[{"name": "top_item", "parameters": {"binary_data": True}}])
    with recommender_replica.client() as client:
        response = client.post("/v2/models/rec/infer", json=request)
    json_length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:json_length])
    assert [o["name"] for o in header["outputs"]] == ["top_item"]
    top = np.frombuffer(response.content[json_length:], dtype="<i8").reshape(2, 1)
    np.testing.assert_array_equal(top, expected_recommendation(item_ids, dense)[1])


@pytest.mark.parametrize(("mutate", "says"), [
    (lambda r: r["inputs"].pop(1), "missing input 'dense'"),
    (lambda r: r["inputs"][1].update(shape=[1, 4], data=[0, 0, 0, 0]), "batch sizes"),
    (lambda r: r["inputs"][0].update(datatype="INT32"), "expects INT64"),
    (lambda r: r["inputs"][0].update(data=[[0.5] * 8] * 2), "integers"),
])
def test_recommender_refuses_inconsistent_inputs(recommender_replica, mutate, says):
    request = recommender_json(*recommender_inputs(2, seed=2))
    mutate(request)
    with recommender_replica.client() as client:
        response = client.post("/v2/models/rec/infer", json=request)
    assert response.status_code == 400 and says in response.json()["error"]


def test_a_model_failure_is_a_500_counted_as_failed_and_spares_its_batch_mates(
        recommender_replica):
    bad_ids, dense = recommender_inputs(1, seed=3)
    bad_ids[0, 0] = RECOMMENDER_ITEMS + 5  # the embedding has no such row: the model raises
    good = [recommender_inputs(1, seed=10 + i) for i in range(12)]
    bodies = [recommender_json(*inputs) for inputs in good]
    bodies.insert(6, recommender_json(bad_ids, dense))
    with recommender_replica.client() as client:
        failed_before = client.get("/stats").json()["failed"]
        responses = asyncio.run(post_all(recommender_replica, "/v2/models/rec/infer", bodies))
        failed_after = client.get("/stats").json()["failed"]
    statuses = [response.status_code for response in responses]
    assert statuses == [200] * 6 + [500] + [200] * 6
    assert "inference failed" in responses[6].json()["error"]
    assert failed_after - failed_before == 1
    for response, inputs in zip(responses[:6] + responses[7:], good, strict=True):
        np.testing.assert_array_equal(outputs_by_name(response)["top_item"],
                                      expected_recommendation(*inputs)[1])


async def post_all(replica: ReplicaProcess, path: str, bodies: list[dict]):
    async with httpx.AsyncClient(base_url=replica.url, headers=AUTH, timeout=60,
                                 limits=httpx.Limits(max_connections=len(bodies))) as http:
        return await asyncio.gather(*(http.post(path, json=body) for body in bodies))


def test_torch_export_program_with_dict_outputs_serves_the_same_results(exported_replica):
    item_ids, dense = recommender_inputs(3, seed=4)
    with exported_replica.client() as client:
        metadata = client.get("/v2/models/rec-export").json()
        response = client.post("/v2/models/rec-export/infer", json=recommender_json(item_ids,
                                                                                   dense))
    assert metadata["platform"] == "pytorch_torch_export"
    outputs = outputs_by_name(response)
    score, top = expected_recommendation(item_ids, dense)
    np.testing.assert_allclose(outputs["score"], score, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(outputs["top_item"], top)


def test_tritonclient_works_unchanged_with_binary_inputs_and_outputs(recommender_replica):
    triton = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    item_ids, dense = recommender_inputs(5, seed=5)
    client = triton.InferenceServerClient(f"127.0.0.1:{recommender_replica.port}")
    headers = dict(AUTH)
    assert client.is_server_live(headers=headers) and client.is_server_ready(headers=headers)
    assert client.is_model_ready("rec", "7", headers=headers)
    assert "binary_tensor_data" in client.get_server_metadata(headers=headers)["extensions"]
    assert client.get_model_metadata("rec", headers=headers)["versions"] == ["7"]
    inputs = [triton.InferInput("item_ids", [5, 8], "INT64"),
              triton.InferInput("dense", [5, 4], "FP32")]
    inputs[0].set_data_from_numpy(item_ids)
    inputs[1].set_data_from_numpy(dense)
    result = client.infer("rec", inputs, model_version="7", request_id="t-1", headers=headers)
    score, top = expected_recommendation(item_ids, dense)
    np.testing.assert_allclose(result.as_numpy("score"), score, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("top_item"), top)
    assert result.get_response()["id"] == "t-1"
    with pytest.raises(InferenceServerException, match="expects INT64") as caught:
        wrong = triton.InferInput("item_ids", [5, 8], "INT32")
        wrong.set_data_from_numpy(item_ids.astype(np.int32))
        client.infer("rec", [wrong, inputs[1]], headers=headers)
    assert caught.value.status() == "400"
    assert not client.is_server_live()  # no key: 401, which tritonclient reads as "not live"
    client.close()
