"""BYTES tensors in the codec (JSON strings, 4-byte length-prefixed binary elements), and
FP16/BF16/BYTES through a real replica and the gateway with tritonclient.http."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import httpx
import ml_dtypes
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from serving.replica import codec
from serving.replica.codec import CodecError, OutputTensor
from serving.replica.datatypes import (
    MAX_BYTES_ELEMENT_BYTES,
    MAX_BYTES_ELEMENTS,
    bytes_from_buffer,
    bytes_to_buffer,
)
from swarm_protocol.signature import parse_signature
from tests.gateway_helpers import BEARER, StandaloneGateway
from tests.replica_models import ReplicaProcess, save_torchscript
from tests.steps_helpers import gateway_for, start_with_steps

TEXT_SIGNATURE = parse_signature({
    "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1, 1]}],
    "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1, 1]}],
})


def binary_request(name: str, shape: list[int], data: bytes) -> tuple[bytes, int]:
    """Return a binary-extension body with one BYTES input and its JSON header's length."""
    head = json.dumps({"inputs": [{"name": name, "datatype": "BYTES", "shape": shape,
                                   "parameters": {"binary_data_size": len(data)}}]}).encode()
    return head + data, len(head)


def decode_binary(shape: list[int], data: bytes) -> np.ndarray:
    body, json_length = binary_request("text", shape, data)
    return codec.decode_infer_request(body, json_length).inputs[0].array


def prefixed(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


# units: the codec


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=20))
def test_length_prefixed_elements_round_trip(elements):
    array = np.array(elements, dtype=object)
    buffer = bytes_to_buffer(array)
    assert len(buffer) == sum(4 + len(e) for e in elements)
    decoded = decode_binary([len(elements)], buffer)
    assert decoded.dtype == object and list(decoded) == elements


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=16), min_size=1, max_size=8), st.data())
def test_a_length_prefix_past_the_buffer_is_a_400_not_an_allocation(elements, data):
    buffer = bytearray(prefixed(*elements))
    index = data.draw(st.integers(0, len(elements) - 1))
    offset = sum(4 + len(e) for e in elements[:index])
    remaining = len(buffer) - offset - 4
    lie = data.draw(st.integers(remaining + 1, 2**32 - 1))
    struct.pack_into("<I", buffer, offset, lie)
    with pytest.raises(CodecError) as caught:
        decode_binary([len(elements)], bytes(buffer))
    assert "input 'text'" in str(caught.value)
    assert "remain" in str(caught.value) or "at most" in str(caught.value)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=40))
def test_any_binary_data_decodes_or_gets_a_codec_error(garbage):
    try:
        array = decode_binary([2], garbage)
    except CodecError:
        return
    assert array.shape == (2,) and bytes_to_buffer(array) == garbage


def test_a_huge_length_prefix_is_refused_by_the_per_element_limit():
    huge = struct.pack("<I", MAX_BYTES_ELEMENT_BYTES + 1) + b"x"
    with pytest.raises(CodecError, match=f"at most {MAX_BYTES_ELEMENT_BYTES}"):
        decode_binary([1], huge)


@pytest.mark.parametrize(("shape", "data", "message"), [
    ([2], prefixed(b"a"), "ends after 1 of 2"),
    ([1], prefixed(b"a") + b"zz", "2 bytes after the last"),
    ([1], b"\x01\x00", "ends after 0 of 1"),
    ([MAX_BYTES_ELEMENTS + 1], b"", "at most"),
])
def test_malformed_binary_bytes_name_the_problem(shape, data, message):
    with pytest.raises(CodecError, match=message):
        decode_binary(shape, data)


def test_json_strings_become_utf8_bytes_nested_or_flat():
    for data in (["héllo", "", "🙂"], [["héllo"], [""], ["🙂"]]):
        header = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3, 1],
                              "data": data}]}
        request = codec.decode_infer_request(json.dumps(header).encode(), None)
        bound = codec.bind_to_signature(request, TEXT_SIGNATURE)
        assert bound.rows == 3
        assert bound.arrays[0].tolist() == [["héllo".encode()], [b""], ["🙂".encode()]]


@pytest.mark.parametrize(("data", "message"), [
    ([1, 2], "must be strings"),
    (["a", None], "must be strings"),
    (["a"], "has 1 elements but shape"),
    (["\ud800", "a"], "lone surrogate"),
])
def test_bad_json_bytes_data_is_a_400(data, message):
    header = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": data}]}
    with pytest.raises(CodecError, match=message):
        codec.decode_infer_request(json.dumps(header).encode(), None)


def test_bytes_datatype_must_match_the_signature():
    header = {"inputs": [{"name": "text", "datatype": "UINT8", "shape": [1, 1], "data": [1]}]}
    request = codec.decode_infer_request(json.dumps(header).encode(), None)
    with pytest.raises(CodecError, match="expects BYTES"):
        codec.bind_to_signature(request, TEXT_SIGNATURE)


def test_bytes_outputs_encode_as_json_strings_or_length_prefixed_binary():
    labels = np.array([["cat"], ["dög"]], dtype=object)
    labels[0, 0], labels[1, 0] = b"cat", "dög".encode()
    encoded = codec.encode_infer_response("m", "1", None, [
        OutputTensor("label", "BYTES", labels, False),
        OutputTensor("raw", "BYTES", labels, True)])
    assert encoded.json_length is not None
    header = json.loads(encoded.body[:encoded.json_length])
    assert header["outputs"][0] == {"name": "label", "datatype": "BYTES", "shape": [2, 1],
                                    "data": ["cat", "dög"]}
    assert header["outputs"][1]["parameters"]["binary_data_size"] == 4 + 3 + 4 + 4
    raw = encoded.body[encoded.json_length:]
    assert bytes_from_buffer(raw, (2, 1)).tolist() == [[b"cat"], ["dög".encode()]]


def test_a_non_utf8_bytes_output_in_json_says_to_ask_for_binary():
    raw = np.array([b"\xff\xfe"], dtype=object)
    with pytest.raises(CodecError, match=r"output 'raw'.*binary data"):
        codec.encode_infer_response("m", "1", None, [OutputTensor("raw", "BYTES", raw, False)])


def test_bytes_arrays_batch_and_split_by_rows():
    first = decode_binary([2, 1], prefixed(b"a", b"bb"))
    second = decode_binary([1, 1], prefixed(b"ccc"))
    batch = np.concatenate([first, second])
    assert batch.shape == (3, 1) and batch[2, 0] == b"ccc"
    assert batch[0:2].tolist() == first.tolist()


@pytest.mark.parametrize("datatype", ["UINT16", "UINT32", "UINT64"])
def test_unsigned_integers_decode_from_json_and_binary(datatype):
    top = np.iinfo(np.dtype(datatype.lower())).max
    header = {"inputs": [{"name": "x", "datatype": datatype, "shape": [2], "data": [0, int(top)]}]}
    array = codec.decode_infer_request(json.dumps(header).encode(), None).inputs[0].array
    assert array.tolist() == [0, int(top)]
    bad = {"inputs": [{"name": "x", "datatype": datatype, "shape": [1], "data": [-1]}]}
    with pytest.raises(CodecError, match=datatype):
        codec.decode_infer_request(json.dumps(bad).encode(), None)


# a real replica behind the gateway: FP16, BF16 and BYTES labels, JSON and binary


class Affine(nn.Module):
    """x [-1, 4] -> 2x + 1, in x's own dtype (FP16 or BF16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1


class Labeller(nn.Module):
    """FP32 features [-1, 3] -> the same as logits: the largest feature wins."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features * 1.0


def half_signature(datatype: str) -> dict:
    return {"inputs": [{"name": "x", "datatype": datatype, "shape": [-1, 4]}],
            "outputs": [{"name": "y", "datatype": datatype, "shape": [-1, 4]}]}


LABELLER_SIGNATURE = {
    "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 3]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]}
LABELLER_STEPS = {
    "outputs": [{"output": "logits", "top_k": 1, "scores": "score", "labels": "label"}],
    "labels": ["réd", "green", "blue"]}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[StandaloneGateway]:
    directory = tmp_path_factory.mktemp("bytes")
    started: list[ReplicaProcess] = []
    try:
        for name, module, signature, steps in [
                ("fp16", Affine(), half_signature("FP16"), None),
                ("bf16", Affine(), half_signature("BF16"), None),
                ("labeller", Labeller(), LABELLER_SIGNATURE, LABELLER_STEPS)]:
            artifact = save_torchscript(module.eval(), directory / f"{name}.pt")
            started.append(start_with_steps(directory, artifact, signature, steps, name=name,
                                            max_batch_size=4))
        with gateway_for(directory, *started) as process:
            yield process
    finally:
        for replica in started:
            replica.stop()


@pytest.fixture
def client(gateway) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=f"127.0.0.1:{gateway.port}")
    yield client
    client.close()


def post(gateway: StandaloneGateway, model: str, body: dict) -> httpx.Response:
    with httpx.Client(base_url=gateway.url, headers=dict(BEARER), timeout=30) as http:
        return http.post(f"/v2/models/{model}/infer", json=body)


X = np.array([[0.5, -1.25, 3.0, 100.0], [0.0, 2.5, -0.75, 7.0]])


@pytest.mark.slow
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp16_through_the_gateway(client, binary):
    x = triton.InferInput("x", [2, 4], "FP16")
    x.set_data_from_numpy(X.astype(np.float16), binary_data=binary)
    result = client.infer("fp16", [x], headers=dict(BEARER),
                          outputs=[triton.InferRequestedOutput("y", binary_data=binary)])
    y = result.as_numpy("y")
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y, (X * 2 + 1).astype(np.float16))


@pytest.mark.slow
@pytest.mark.parametrize("binary_output", [True, False], ids=["binary", "json"])
def test_bf16_through_the_gateway(client, binary_output):
    x = triton.InferInput("x", [2, 4], "BF16")  # tritonclient sends BF16 as binary only
    x.set_data_from_numpy(X.astype(ml_dtypes.bfloat16), binary_data=True)
    result = client.infer("bf16", [x], headers=dict(BEARER),
                          outputs=[triton.InferRequestedOutput("y", binary_data=binary_output)])
    y = np.asarray(result.as_numpy("y"), dtype=np.float32)
    np.testing.assert_array_equal(y, X * 2 + 1)  # every value here is exact in bfloat16


@pytest.mark.slow
def test_bf16_in_json_through_the_gateway(gateway):
    response = post(gateway, "bf16", {"inputs": [
        {"name": "x", "datatype": "BF16", "shape": [2, 4], "data": X.ravel().tolist()}]})
    assert response.status_code == 200
    output = response.json()["outputs"][0]
    assert output["datatype"] == "BF16" and output["data"] == (X * 2 + 1).ravel().tolist()


@pytest.mark.slow
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bytes_labels_come_back_as_json_strings_or_binary(client, binary):
    features = triton.InferInput("features", [3, 3], "FP32")
    features.set_data_from_numpy(np.eye(3, dtype=np.float32), binary_data=binary)
    result = client.infer("labeller", [features], headers=dict(BEARER),
                          outputs=[triton.InferRequestedOutput("label", binary_data=binary)])
    labels = [e.decode() if isinstance(e, bytes) else e
              for e in result.as_numpy("label").ravel()]
    assert labels == ["réd", "green", "blue"]


@pytest.mark.slow
def test_bytes_input_to_a_numeric_model_is_a_400(gateway):
    response = post(gateway, "labeller", {"inputs": [
        {"name": "features", "datatype": "BYTES", "shape": [1, 3], "data": ["a", "b", "c"]}]})
    assert response.status_code == 400
    assert "expects FP32" in response.json()["error"]


@pytest.mark.slow
def test_a_lying_length_prefix_through_the_gateway_is_a_400(gateway):
    body, json_length = binary_request("features", [1, 3], struct.pack("<I", 2**31))
    with httpx.Client(base_url=gateway.url, headers=dict(BEARER), timeout=30) as http:
        response = http.post("/v2/models/labeller/infer", content=body, headers={
            "Inference-Header-Content-Length": str(json_length),
            "Content-Type": "application/octet-stream"})
    assert response.status_code == 400
    assert "input 'features'" in response.json()["error"]
