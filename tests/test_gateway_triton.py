"""tritonclient.http, unchanged, against the standalone gateway process (file-fed table)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from serving.gateway.filesource import write_table
from serving.gateway.routes import RouteTable
from tests.gateway_helpers import (
    BEARER,
    MLP,
    Fleet,
    StandaloneGateway,
    api_key,
    deployment,
    expected_scores,
    features,
    metric_value,
    replica_route,
    shared_fleet,
    table,
    wait_for,
)

pytestmark = pytest.mark.slow
METRICS_TOKEN = "scrape-token"


def key() -> dict[str, str]:
    """Return fresh headers with the API key: tritonclient adds its own to the dict given."""
    return dict(BEARER)


@pytest.fixture(scope="module")
def fleet(request, tmp_path_factory) -> Fleet:
    return shared_fleet(request, tmp_path_factory)


def gateway_table(fleet: Fleet, *keys) -> RouteTable:
    replicas = [replica_route(fleet.mlp_v1[0], 1), replica_route(fleet.mlp_v1[1], 2),
                replica_route(fleet.mlp_v2, 3, version=2)]
    return table(deployment(MLP, replicas, {1: 1.0, 2: 0.0}), keys=keys)


@pytest.fixture(scope="module")
def table_path(fleet, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gateway-table") / "table.json"
    write_table(path, gateway_table(fleet, api_key("doomed", 2)))
    return path


@pytest.fixture(scope="module")
def gateway(table_path) -> Iterator[StandaloneGateway]:
    process = StandaloneGateway(table_path, env={"SWARM_GATEWAY_METRICS_TOKEN": METRICS_TOKEN})
    yield process
    process.stop()


@pytest.fixture
def client(gateway) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=f"127.0.0.1:{gateway.port}")
    yield client
    client.close()


def infer(client: triton.InferenceServerClient, rows: np.ndarray, binary: bool,
          **options) -> triton.InferResult:
    features_input = triton.InferInput("features", list(rows.shape), "FP32")
    features_input.set_data_from_numpy(rows, binary_data=binary)
    outputs = [triton.InferRequestedOutput("scores", binary_data=binary)]
    return client.infer(MLP, [features_input], outputs=outputs, headers=key(), **options)


def test_server_health_and_metadata_need_no_key(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "swarm-portal"
    assert "binary_tensor_data" in metadata["extensions"]


def test_model_readiness_and_metadata_with_a_key(client):
    assert client.is_model_ready(MLP, headers=key())
    assert client.is_model_ready(MLP, "2", headers=key())
    assert not client.is_model_ready("nope", headers=key())
    metadata = client.get_model_metadata(MLP, headers=key())
    assert metadata["versions"] == ["1", "2"]
    assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_inference_works_with_binary_and_json_tensors(client, binary):
    rows = features(5, seed=11)
    result = infer(client, rows, binary)
    np.testing.assert_allclose(result.as_numpy("scores"), expected_scores(rows),
                               rtol=1e-5, atol=1e-6)
    assert result.get_response()["model_version"] == "1"


def test_a_pinned_version_and_default_outputs(client):
    rows = features(2, seed=3)
    features_input = triton.InferInput("features", list(rows.shape), "FP32")
    features_input.set_data_from_numpy(rows)
    result = client.infer(MLP, [features_input], model_version="2", headers=key())
    assert result.get_response()["model_version"] == "2"
    np.testing.assert_allclose(result.as_numpy("scores"), expected_scores(rows), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize(("model", "headers", "status", "message"), [
    (MLP, {}, "401", "missing API key"),
    (MLP, {"Authorization": "Bearer wrong"}, "401", "unknown API key"),
    ("nope", dict(BEARER), "404", "unknown model"),
])
def test_gateway_errors_reach_tritonclient_as_exceptions(client, model, headers, status,
                                                         message):
    features_input = triton.InferInput("features", [1, 4], "FP32")
    features_input.set_data_from_numpy(features(1))
    with pytest.raises(InferenceServerException) as raised:
        client.infer(model, [features_input], headers=headers)
    assert raised.value.status() == status
    assert message in raised.value.message()


def test_rewriting_the_table_file_revokes_a_key_within_a_second(client, fleet, table_path):
    doomed = {"Authorization": "Bearer doomed"}
    features_input = triton.InferInput("features", [1, 4], "FP32")
    features_input.set_data_from_numpy(features(1))
    client.infer(MLP, [features_input], headers=doomed)  # works before
    write_table(table_path, gateway_table(fleet))
    written_s = time.monotonic()

    def refused() -> bool:
        try:
            client.infer(MLP, [features_input], headers=doomed)
        except InferenceServerException as exc:
            return exc.status() == "401"
        return False

    wait_for(refused, "the key to be revoked", deadline_s=5)
    assert time.monotonic() - written_s < 1.0


def test_metrics_need_their_token_and_count_requests(gateway, client):
    infer(client, features(1), True)
    with httpx.Client(base_url=gateway.url) as http:
        assert http.get("/metrics").status_code == 401
        scraped = http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert scraped.status_code == 200
    assert metric_value(scraped.text, "nv_inference_request_success_total",
                        model=MLP, version="1") >= 1
