"""A real replica process serving the tabular MLP (TorchScript), over real HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch

from tests.replica_models import (
    AUTH,
    MLP_SIGNATURE,
    ReplicaProcess,
    build_tabular_mlp,
    save_torchscript,
    start_replica,
)

pytestmark = pytest.mark.slow
NAME, VERSION = "tabular", 2
INFER = f"/v2/models/{NAME}/infer"


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Iterator[ReplicaProcess]:
    directory = tmp_path_factory.mktemp("replica-mlp")
    artifact = save_torchscript(build_tabular_mlp(seed=0), directory / "mlp.pt")
    process = start_replica(directory, artifact, "torchscript", MLP_SIGNATURE, name=NAME,
                            version=VERSION, max_batch_size=8, max_queue_delay_ms=2.0)
    yield process
    process.stop()


@pytest.fixture
def client(replica):
    with replica.client() as http:
        yield http


def expected_scores(rows: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return build_tabular_mlp(seed=0)(torch.from_numpy(rows)).numpy()


def features(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, 4)).astype(np.float32)


def json_request(rows: np.ndarray, **extra) -> dict:
    return {"inputs": [{"name": "features", "datatype": "FP32", "shape": list(rows.shape),
                        "data": rows.tolist()}], **extra}


def scores_of(response: httpx.Response) -> np.ndarray:
    output = response.json()["outputs"][0]
    return np.array(output["data"], dtype=np.float32).reshape(output["shape"])


def test_it_prints_the_ready_line_and_answers_health_checks(replica, client):
    assert replica.ready_line == f"REPLICA READY port={replica.port}"
    live, ready = client.get("/v2/health/live"), client.get("/v2/health/ready")
    assert (live.status_code, live.json()) == (200, {"live": True})
    assert (ready.status_code, ready.json()) == (200, {"ready": True})


@pytest.mark.parametrize("path", ["/v2", "/v2/"])
def test_server_metadata_answers_on_both_paths_without_a_redirect(client, path):
    response = client.get(path)
    assert response.status_code == 200
    assert "binary_tensor_data" in response.json()["extensions"]


@pytest.mark.parametrize("base", [f"/v2/models/{NAME}", f"/v2/models/{NAME}/versions/{VERSION}"])
def test_model_metadata_and_readiness_with_and_without_a_version(client, base):
    metadata = client.get(base)
    assert metadata.status_code == 200
    assert metadata.json() == {"name": NAME, "versions": ["2"],
                               "platform": "pytorch_torchscript", **MLP_SIGNATURE}
    assert client.get(f"{base}/ready").status_code == 200


@pytest.mark.parametrize(("method", "path", "says"), [
    ("GET", "/v2/models/other", "unknown model 'other'"),
    ("GET", "/v2/models/other/ready", "unknown model 'other'"),
    ("POST", "/v2/models/other/infer", "unknown model 'other'"),
    ("GET", f"/v2/models/{NAME}/versions/9", "unknown version '9'"),
    ("POST", f"/v2/models/{NAME}/versions/9/infer", "unknown version '9'"),
    ("GET", f"/v2/models/{NAME}/versions/9/ready", "unknown version '9'"),
    ("GET", "/v2/repository/index", "no such endpoint"),
    ("GET", "/", "no such endpoint"),
])
def test_unknown_models_versions_and_paths_are_404_json(client, method, path, says):
    response = client.request(method, path, json=json_request(features(1, 0)))
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert says in response.json()["error"]


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong-key-wrong-key"},
    {"Authorization": AUTH["Authorization"].removeprefix("Bearer ")},
    {"Authorization": AUTH["Authorization"] + "x"},
    {"Authorization": "Basic dXNlcjpwdw=="},
])
@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready", "/v2", "/stats",
                                  f"/v2/models/{NAME}", "/v2/models/other"])
def test_every_endpoint_refuses_a_missing_or_wrong_key(replica, headers, path):
    response = httpx.get(replica.url + path, headers=headers)
    assert response.status_code == 401
    assert "error" in response.json()


def test_infer_without_a_key_is_refused_before_the_model_runs(replica):
    response = httpx.post(replica.url + INFER, json=json_request(features(1, 0)))
    assert response.status_code == 401


def test_json_inference_matches_the_model_and_echoes_the_id(client):
    rows = features(5, seed=1)
    response = client.post(f"/v2/models/{NAME}/versions/{VERSION}/infer",
                           json=json_request(rows, id="req-42"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model_name"], body["model_version"], body["id"]) == (NAME, "2", "req-42")
    assert body["outputs"][0]["datatype"] == "FP32"
    np.testing.assert_allclose(scores_of(response), expected_scores(rows), rtol=1e-5, atol=1e-6)


def test_flat_json_data_is_accepted(client):
    rows = features(2, seed=2)
    request = json_request(rows)
    request["inputs"][0]["data"] = rows.reshape(-1).tolist()
    response = client.post(INFER, json=request)
    np.testing.assert_allclose(scores_of(response), expected_scores(rows), rtol=1e-5, atol=1e-6)


def binary_request(rows: np.ndarray, binary_output: bool = True) -> tuple[bytes, dict]:
    payload = rows.astype("<f4").tobytes()
    header = json.dumps({
        "inputs": [{"name": "features", "datatype": "FP32", "shape": list(rows.shape),
                    "parameters": {"binary_data_size": len(payload)}}],
        "outputs": [{"name": "scores", "parameters": {"binary_data": binary_output}}],
    }).encode()
    return header + payload, {"Inference-Header-Content-Length": str(len(header)),
                              "Content-Type": "application/octet-stream"}


def test_binary_inputs_and_outputs_round_trip(client):
    rows = features(3, seed=3)
    body, headers = binary_request(rows)
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    json_length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:json_length])
    output = header["outputs"][0]
    assert output["parameters"]["binary_data_size"] == 3 * 3 * 4 and "data" not in output
    scores = np.frombuffer(response.content[json_length:], dtype="<f4").reshape(output["shape"])
    np.testing.assert_allclose(scores, expected_scores(rows), rtol=1e-5, atol=1e-6)


def test_binary_inputs_with_json_outputs(client):
    rows = features(2, seed=4)
    body, headers = binary_request(rows, binary_output=False)
    response = client.post(INFER, content=body, headers=headers)
    assert response.headers["content-type"] == "application/json"
    np.testing.assert_allclose(scores_of(response), expected_scores(rows), rtol=1e-5, atol=1e-6)


def one_input(**fields) -> dict:
    tensor = {"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
    return {"inputs": [{**tensor, **fields}]}


@pytest.mark.parametrize(("request_body", "says"), [
    (one_input(name="other"), "unknown input 'other'"),
    ({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4],
                  "data": [1, 2, 3, 4]}, {"name": "more", "datatype": "FP32", "shape": [1],
                                          "data": [1]}]}, "unknown input 'more'"),
    (one_input(datatype="FP64"), "has datatype FP64, the model expects FP32"),
    (one_input(datatype="INT32"), "has datatype INT32, the model expects FP32"),
    (one_input(shape=[1, 5], data=[1, 2, 3, 4, 5]), "has shape [1, 5]"),
    (one_input(shape=[4], data=[1, 2, 3, 4]), "has shape [4]"),
    (one_input(shape=[2, 4]), "4 elements but shape [2, 4] needs 8"),
    (one_input(data=[[1, 2], [3]]), "ragged"),
    (one_input(data="1,2,3,4"), "JSON array"),
    ({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4],
                  "data": [1, 2, 3, 4]}], "outputs": [{"name": "probabilities"}]},
     "unknown output 'probabilities'"),
    ({"outputs": []}, "inputs must be a non-empty list"),
])
def test_bad_json_requests_get_400_with_a_clear_error(client, request_body, says):
    response = client.post(INFER, json=request_body)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert says in response.json()["error"]


@pytest.mark.parametrize(("body", "headers", "says"), [
    (b"{\"inputs\": [", {}, "not valid JSON"),
    (b"\xff\xfe", {}, "not valid JSON"),
    (b"", {}, "not valid JSON"),
    (b"{}", {"Inference-Header-Content-Length": "abc"}, "must be a non-negative integer"),
    (b"{}", {"Inference-Header-Content-Length": "99"}, "only 2 bytes"),
    (b"{}", {"Content-Encoding": "gzip"}, "Content-Encoding"),
])
def test_malformed_bodies_get_400(client, body, headers, says):
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 400
    assert says in response.json()["error"]


@pytest.mark.parametrize("payload_bytes", [12, 20])
def test_binary_sizes_that_do_not_match_get_400(client, payload_bytes):
    header = json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4],
                                     "parameters": {"binary_data_size": 16}}]}).encode()
    response = client.post(INFER, content=header + b"\0" * payload_bytes,
                           headers={"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 400
    assert "binary data" in response.json()["error"]


def test_wrong_methods_get_405_json(client):
    response = client.get(INFER)
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert "error" in response.json()


def stats(client) -> dict:
    response = client.get("/stats")
    assert response.status_code == 200
    return response.json()


def test_stats_report_state_counters_and_latency(client):
    client.post(INFER, json=json_request(features(1, 5)))
    snapshot = stats(client)
    assert set(snapshot) == {"state", "in_flight", "queue_depth", "completed", "failed",
                             "latency_p50_ms", "latency_p99_ms", "batches", "batched_rows",
                             "in_flight_seconds", "clock_s"}
    assert snapshot["state"] == "ready" and snapshot["in_flight"] == 0
    assert snapshot["queue_depth"] == 0 and snapshot["completed"] >= 1
    assert 0 < snapshot["latency_p50_ms"] <= snapshot["latency_p99_ms"]


def test_in_flight_seconds_add_up_the_time_requests_spent_in_flight(client):
    before = stats(client)
    started_s = time.monotonic()
    client.post(INFER, json=json_request(features(1, 5)))
    elapsed_s = time.monotonic() - started_s
    after = stats(client)
    busy_s = after["in_flight_seconds"] - before["in_flight_seconds"]
    # One request was in flight for part of the client's round trip, and never longer.
    assert 0 < busy_s <= elapsed_s
    assert after["clock_s"] > before["clock_s"]


async def fire_concurrently(replica: ReplicaProcess, requests: list[dict]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(requests))
    async with httpx.AsyncClient(base_url=replica.url, headers=AUTH, limits=limits,
                                 timeout=60) as http:
        return await asyncio.gather(*(http.post(INFER, json=body) for body in requests))


def test_concurrent_requests_are_batched_and_get_the_same_results_as_one_by_one(replica,
                                                                                 client):
    batches = [features(1 + index % 3, seed=100 + index) for index in range(48)]
    requests = [json_request(rows, id=str(index)) for index, rows in enumerate(batches)]
    alone = [scores_of(client.post(INFER, json=body)) for body in requests]
    before = stats(client)

    responses = asyncio.run(fire_concurrently(replica, requests))

    after = stats(client)
    for index, response in enumerate(responses):
        assert response.status_code == 200, response.text
        assert response.json()["id"] == str(index)
        np.testing.assert_allclose(scores_of(response), alone[index], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(alone[index], expected_scores(batches[index]), rtol=1e-5,
                                   atol=1e-6)
    completed = after["completed"] - before["completed"]
    forward_passes = after["batches"] - before["batches"]
    assert completed == len(requests)
    assert after["batched_rows"] - before["batched_rows"] == sum(len(b) for b in batches)
    assert forward_passes < len(requests), "no two requests shared a forward pass"
