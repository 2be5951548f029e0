"""OIP over gRPC: tritonclient.grpc, unchanged, and the raw generated stub against the
standalone gateway process (`--grpc-port`), with real replicas behind it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import uvloop
from tritonclient.utils import InferenceServerException

from serving.gateway.app import GatewayApp
from serving.gateway.filesource import write_table
from serving.gateway.grpc_server import start_grpc
from serving.gateway.proto import grpc_predict_v2_pb2 as pb
from serving.gateway.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.gateway.routes import RouteTable
from tests.gateway_helpers import (
    MLP,
    SECRET,
    Fleet,
    MemoryTableSource,
    StandaloneGateway,
    api_key,
    completed,
    deployment,
    expected_scores,
    features,
    metric_value,
    mlp_artifact,
    replica_route,
    shared_fleet,
    start_replicas,
    table,
    wait_for,
)
from tests.replica_models import MLP_SIGNATURE, free_port

pytestmark = pytest.mark.slow
METRICS_TOKEN = "scrape-token"
MAX_BODY_BYTES = 64 * 1024  # so a 80 kB tensor is too large
EMPTY = "empty"  # a deployment with no replica
KEY_METADATA = (("authorization", f"Bearer {SECRET}"),)


def key() -> dict[str, str]:
    return {"authorization": f"Bearer {SECRET}"}


class GrpcGateway:
    """A standalone gateway serving REST and gRPC."""

    def __init__(self, table_path: Path) -> None:
        self.grpc_port = free_port()
        self.process = StandaloneGateway(
            table_path, "--grpc-port", str(self.grpc_port), "--max-body-bytes",
            str(MAX_BODY_BYTES), env={"SWARM_GATEWAY_METRICS_TOKEN": METRICS_TOKEN})

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def scrape(self) -> str:
        with httpx.Client(base_url=self.process.url) as http:
            return http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text


class GrpcThread:
    """An in-process GatewayApp's gRPC server (start_grpc) on an event loop in a thread."""

    def __init__(self, app: GatewayApp) -> None:
        self.app = app
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc", daemon=True)

    def __enter__(self) -> GrpcThread:
        self._thread.start()
        self.server = self._run(start_grpc(self.app, "127.0.0.1", 0))
        self.target = f"127.0.0.1:{self.server.bound_port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._run(self.server.stop(0))
        self._run(self.app.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)


@pytest.fixture(scope="module")
def fleet(request, tmp_path_factory) -> Fleet:
    return shared_fleet(request, tmp_path_factory)


def gateway_table(fleet: Fleet) -> RouteTable:
    replicas = [replica_route(fleet.mlp_v1[0], 1), replica_route(fleet.mlp_v1[1], 2),
                replica_route(fleet.mlp_v2, 3, version=2)]
    return table(deployment(MLP, replicas, {1: 1.0, 2: 0.0}), deployment(EMPTY, []),
                 keys=[api_key("slowpoke", 2, rate_limit_rps=0.2),
                       api_key("narrow", 3, deployments=[EMPTY])])


@pytest.fixture(scope="module")
def gateway(fleet, tmp_path_factory) -> Iterator[GrpcGateway]:
    path = tmp_path_factory.mktemp("grpc-table") / "table.json"
    write_table(path, gateway_table(fleet))
    gateway = GrpcGateway(path)
    yield gateway
    gateway.process.stop()


@pytest.fixture
def client(gateway) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=gateway.target)
    yield client
    client.close()


@pytest.fixture
def stub(gateway) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(gateway.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def infer(client: triton.InferenceServerClient, rows: np.ndarray, model: str = MLP,
          **options) -> triton.InferResult:
    features_input = triton.InferInput("features", list(rows.shape), "FP32")
    features_input.set_data_from_numpy(rows)
    return client.infer(model, [features_input], outputs=[triton.InferRequestedOutput("scores")],
                        **{"headers": key(), **options})


def raw_request(rows: np.ndarray, typed: bool = False) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MLP, id="r-1")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    if typed:
        tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    else:
        request.raw_input_contents.append(rows.tobytes())
    return request


def raised_status(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as raised:
        call(*args, **kwargs)
    return raised.value


def test_server_health_and_metadata_need_no_key(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "swarm-portal"
    assert "binary_tensor_data" in metadata["extensions"]


def test_model_readiness_and_metadata_with_a_key(client):
    assert client.is_model_ready(MLP, headers=key())
    assert client.is_model_ready(MLP, "2", headers=key())
    assert not client.is_model_ready("nope", headers=key())
    assert not client.is_model_ready(EMPTY, headers=key())
    metadata = client.get_model_metadata(MLP, headers=key(), as_json=True)
    assert metadata["versions"] == ["1", "2"]
    assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": ["-1", "4"]}]
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata(MLP)
    assert raised.value.status() == "StatusCode.UNAUTHENTICATED"


@pytest.mark.parametrize("rows", [1, 7], ids=["one-row", "batched-rows"])
def test_tritonclient_infers_with_raw_tensors(client, rows):
    batch = features(rows, seed=rows)
    result = infer(client, batch)
    np.testing.assert_allclose(result.as_numpy("scores"), expected_scores(batch),
                               rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response.model_version == "1"
    assert len(response.raw_output_contents) == 1  # the scores as bytes: no typed contents
    assert not response.outputs[0].HasField("contents")


def test_a_pinned_version_and_default_outputs(client):
    rows = features(2, seed=3)
    features_input = triton.InferInput("features", list(rows.shape), "FP32")
    features_input.set_data_from_numpy(rows)
    result = client.infer(MLP, [features_input], model_version="2", headers=key())
    assert result.get_response().model_version == "2"
    np.testing.assert_allclose(result.as_numpy("scores"), expected_scores(rows), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("typed", [False, True], ids=["raw-contents", "typed-contents"])
def test_the_raw_stub_sends_raw_or_typed_contents_and_gets_raw_outputs(stub, typed):
    rows = features(3, seed=5)
    response = stub.ModelInfer(raw_request(rows, typed), metadata=KEY_METADATA)
    assert (response.model_name, response.id) == (MLP, "r-1")
    expected = expected_scores(rows)
    (output,) = response.outputs
    assert (output.name, output.datatype) == ("scores", "FP32")
    assert list(output.shape) == list(expected.shape)
    scores = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(expected.shape)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("model", "headers", "shape", "status", "message"), [
    (MLP, {}, [1, 4], "UNAUTHENTICATED", "missing API key"),
    (MLP, {"authorization": "Bearer wrong"}, [1, 4], "UNAUTHENTICATED", "unknown API key"),
    (MLP, {"authorization": "Bearer narrow"}, [1, 4], "PERMISSION_DENIED", "may not call"),
    ("nope", key(), [1, 4], "NOT_FOUND", "unknown model 'nope'"),
    (MLP, key(), [1, 3], "INVALID_ARGUMENT", "has shape [1, 3], the model expects"),
    (EMPTY, key(), [1, 4], "UNAVAILABLE", "no ready replica of 'empty'"),
])
def test_errors_reach_tritonclient_as_grpc_status_codes(client, model, headers, shape, status,
                                                         message):
    features_input = triton.InferInput("features", shape, "FP32")
    features_input.set_data_from_numpy(features(1)[:, :shape[1]])
    error = raised_status(client.infer, model, [features_input], headers=headers)
    assert error.status() == f"StatusCode.{status}"
    assert message in error.message()


def test_contents_that_do_not_match_the_inputs_are_invalid(stub):
    request = raw_request(features(1))
    request.raw_input_contents.append(b"\0" * 16)  # two raw entries for one input
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(request, metadata=KEY_METADATA)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents has 2 entries" in raised.value.details()


def test_a_rate_limited_key_gets_resource_exhausted_with_retry_after(stub):
    metadata = (("authorization", "Bearer slowpoke"),)
    stub.ModelInfer(raw_request(features(1)), metadata=metadata)  # the bucket's one token
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(raw_request(features(1)), metadata=metadata)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate limit exceeded" in raised.value.details()
    assert dict(raised.value.trailing_metadata())["retry-after"].isdigit()


def test_a_message_larger_than_the_body_limit_is_refused(stub):
    big = features(MAX_BODY_BYTES // 16 + 1)  # 16 bytes a row: just over the limit
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(raw_request(big), metadata=KEY_METADATA)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_metrics_count_grpc_requests(gateway, client):
    before = metric_value(gateway.scrape(), "nv_inference_request_success_total",
                          model=MLP, version="1")
    for seed in range(3):
        infer(client, features(1, seed=seed))
    after = metric_value(gateway.scrape(), "nv_inference_request_success_total",
                         model=MLP, version="1")
    assert after == before + 3


def test_a_replica_killed_mid_run_is_retried_elsewhere(fleet, tmp_path):
    """Load from four threads while one of two replicas is killed: no request fails."""
    (doomed,) = start_replicas(tmp_path, [(mlp_artifact(fleet.directory), MLP_SIGNATURE,
                                           {"name": MLP, "version": 1})])
    path = tmp_path / "table.json"
    write_table(path, table(deployment(MLP, [replica_route(fleet.mlp_v1[0], 1),
                                             replica_route(doomed, 2)])))
    gateway = GrpcGateway(path)
    survivor_before = completed(fleet.mlp_v1[0])
    try:
        done: list[int] = []
        # Expected answers first: building the reference model seeds torch's global RNG,
        # which threads building it at once would share.
        batches = [features(2, seed=seed) for seed in range(160)]
        expected = [expected_scores(rows) for rows in batches]

        def load(worker: int) -> int:
            client = triton.InferenceServerClient(url=gateway.target)
            try:
                for index in range(worker, 160, 4):
                    np.testing.assert_allclose(infer(client, batches[index]).as_numpy("scores"),
                                               expected[index], rtol=1e-5, atol=1e-6)
                    done.append(1)
            finally:
                client.close()
            return worker

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(load, worker) for worker in range(4)]
            # Killed mid-run, once both replicas have taken traffic.
            wait_for(lambda: (len(done) >= 30 and completed(doomed) > 0)
                     or any(f.done() for f in futures), "both replicas to serve")
            doomed.process.kill()
            assert sorted(f.result() for f in futures) == [0, 1, 2, 3]  # raises on a failure
        assert len(done) == 160
        survivor_served = completed(fleet.mlp_v1[0]) - survivor_before
        assert 0 < survivor_served < 160 + 16, survivor_served  # and took over
        assert metric_value(gateway.scrape(), "nv_inference_request_failure_total",
                            model=MLP, version="1") == 0
    finally:
        doomed.stop()
        gateway.process.stop()


@pytest.fixture
def at_zero() -> Iterator[tuple[GrpcThread, MemoryTableSource]]:
    source = MemoryTableSource(table(deployment(MLP, [], hold_timeout_s=20.0)))
    app = GatewayApp(source, poll_interval_s=0.05)
    with GrpcThread(app) as gateway:
        yield gateway, source
        wait_for(lambda: not any(app.cold_starts.held.values()), "no request held", 10)
        assert not any(app.in_flight().values())


def test_a_grpc_request_at_zero_is_held_until_a_replica_is_listed(fleet, at_zero):
    gateway, source = at_zero
    with grpc.insecure_channel(gateway.target) as channel, ThreadPoolExecutor(1) as pool:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        pending = pool.submit(stub.ModelInfer, raw_request(features(1)),
                              metadata=KEY_METADATA, timeout=30)
        wait_for(lambda: gateway.app.cold_starts.held.get(MLP) == 1, "the request to be held")
        source.set(table(deployment(MLP, [replica_route(fleet.mlp_v1[0], 1)],
                                    hold_timeout_s=20.0)))
        response = pending.result(timeout=20)
    assert response.outputs[0].name == "scores"


def test_a_grpc_deadline_that_passes_while_held_ends_the_hold(at_zero):
    gateway, _source = at_zero
    with grpc.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(raw_request(features(1)), metadata=KEY_METADATA, timeout=0.5)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Well before the 20 s hold timeout: the cancelled call is no longer held, and counted.
    wait_for(lambda: gateway.app.cold_starts.held.get(MLP) == 0, "the hold to end", 5)
    scraped = gateway.app.metrics.render().decode()
    assert metric_value(scraped, "swarm_gateway_cancelled_total", model=MLP) == 1
