"""Hostile input at a real replica: every odd request is a 400 with JSON, every answer is JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from swarm_protocol.wire_numbers import parse_count
from tests.replica_models import ReplicaProcess, save_torchscript, start_replica

pytestmark = pytest.mark.slow
NAME = "logs"
INFER = f"/v2/models/{NAME}/infer"
LOG_SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
}


class Log(nn.Module):
    """y = log(x): NaN below zero, -inf at zero, so outputs need not be finite."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Iterator[ReplicaProcess]:
    directory = tmp_path_factory.mktemp("replica-log")
    artifact = save_torchscript(Log(), directory / "log.pt")
    process = start_replica(directory, artifact, "torchscript", LOG_SIGNATURE, name=NAME)
    yield process
    process.stop()


@pytest.fixture
def client(replica) -> Iterator[httpx.Client]:
    with replica.client() as http:
        yield http


def strict_json(content: bytes) -> Any:
    """Parse JSON as strict parsers do: NaN and Infinity are errors."""
    def refuse(token: str) -> Any:
        raise ValueError(f"not JSON: {token}")
    return json.loads(content, parse_constant=refuse)


def log_request(values: list[float], **parameters: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": values}],
            "parameters": parameters}


def binary_body(values: list[float]) -> tuple[bytes, bytes]:
    payload = np.array(values, dtype="<f4").tobytes()
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2],
                                     "parameters": {"binary_data_size": len(payload)}}]})
    return header.encode(), payload


def test_non_finite_json_outputs_are_strings_a_strict_parser_accepts(client):
    response = client.post(INFER, json=log_request([-1.0, 0.0]))
    assert response.status_code == 200
    assert strict_json(response.content)["outputs"][0]["data"] == ["NaN", "-Infinity"]
    finite = strict_json(client.post(INFER, json=log_request([1.0, 1.0])).content)
    assert finite["outputs"][0]["data"] == [0.0, 0.0]


def test_binary_outputs_carry_non_finite_values_as_they_are(client):
    response = client.post(INFER, json=log_request([-1.0, 0.0], binary_data_output=True))
    json_length = int(response.headers["inference-header-content-length"])
    strict_json(response.content[:json_length])
    values = np.frombuffer(response.content[json_length:], dtype="<f4")
    assert np.isnan(values[0]) and values[1] == -np.inf


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_tokens_in_a_request_are_a_400(client, token):
    body = json.dumps(log_request([1.0, 1.0])).replace("1.0]", f"{token}]").encode()
    response = client.post(INFER, content=body)
    assert response.status_code == 400
    error = strict_json(response.content)["error"]
    assert token in error and "binary" in error


@pytest.mark.parametrize(("shape", "says"), [
    ([1] * 65, "65 dimensions"),
    ([0, 2**62], "more than"),
    ([2**40, 2**40], "more than"),
])
def test_shapes_numpy_cannot_describe_are_a_400(client, shape, says):
    tensor = {"name": "x", "datatype": "FP32", "shape": shape, "data": []}
    response = client.post(INFER, json={"inputs": [tensor]})
    assert response.status_code == 400
    assert says in strict_json(response.content)["error"]


@pytest.mark.parametrize("length", ["²", "٣", "9" * 5000, "-1", "1_0", "+5", "0x10"])
def test_an_odd_inference_header_content_length_is_a_400(client, length):
    header, payload = binary_body([1.0, 2.0])
    response = client.post(INFER, content=header + payload,
                           headers={"Inference-Header-Content-Length": length.encode()})
    assert response.status_code == 400
    assert "must be a non-negative integer" in strict_json(response.content)["error"]


def test_a_binary_request_without_its_header_length_is_told_which_input_and_how_long(client):
    header, payload = binary_body([1.0, 2.0])
    for payload_bytes in (payload, b"\x80" * 8):  # invalid UTF-8, then bytes JSON can read
        response = client.post(INFER, content=header + payload_bytes)
        assert response.status_code == 400
        error = strict_json(response.content)["error"]
        assert "input 'x' declares 8 bytes of binary data" in error
        assert "Inference-Header-Content-Length" in error
        assert f"{len(header)} bytes long" in error


@pytest.mark.parametrize("delta", [-3, 3])
def test_a_wrong_header_length_is_told_the_right_one(client, delta):
    header, payload = binary_body([1.0, 2.0])
    response = client.post(INFER, content=header + payload,
                           headers={"Inference-Header-Content-Length": str(len(header) + delta)})
    assert response.status_code == 400
    error = strict_json(response.content)["error"]
    assert f"JSON part of the body is {len(header)} bytes long" in error


def test_the_wire_number_parser_takes_only_bounded_ascii_digits():
    assert parse_count("42") == 42 and parse_count(b"0") == 0
    assert parse_count(str(2**63 - 1)) == 2**63 - 1 and parse_count(str(2**63)) is None
    for bad in ("", "²", "٣", "-1", "+1", " 1", "1 ", "1_0", "0x1", b"\xc2\xb2", None):
        assert parse_count(bad) is None, bad
    assert parse_count("11", max_value=10) is None
