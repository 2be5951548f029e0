"""The pure gRPC <-> REST codec: ModelInferRequest to the replica's binary request, back."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from serving.gateway.grpc_codec import (
    GrpcCodecError,
    error_details,
    grpc_code,
    grpc_response,
    rest_request,
)
from serving.gateway.proto import grpc_predict_v2_pb2 as pb


def split(body_and_length: tuple[bytes, int]) -> tuple[dict, bytes]:
    body, json_length = body_and_length
    return json.loads(body[:json_length]), body[json_length:]


@pytest.mark.parametrize(("datatype", "field", "values", "dtype"), [
    ("BOOL", "bool_contents", [True, False, True], "?"),
    ("INT8", "int_contents", [-128, 0, 127], "i1"),
    ("INT16", "int_contents", [-300, 2, 30000], "<i2"),
    ("INT32", "int_contents", [-(2**31), 5, 2**31 - 1], "<i4"),
    ("INT64", "int64_contents", [-(2**63), 0, 2**63 - 1], "<i8"),
    ("UINT8", "uint_contents", [0, 1, 255], "u1"),
    ("UINT16", "uint_contents", [0, 1, 65535], "<u2"),
    ("UINT32", "uint_contents", [0, 1, 2**32 - 1], "<u4"),
    ("UINT64", "uint64_contents", [0, 1, 2**64 - 1], "<u8"),
    ("FP32", "fp32_contents", [0.5, -1.25, float("inf")], "<f4"),
    ("FP64", "fp64_contents", [0.1, -2.5, float("nan")], "<f8"),
])
def test_typed_contents_become_little_endian_binary_data(datatype, field, values, dtype):
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[1, 3])
    getattr(tensor.contents, field).extend(values)
    header, data = split(rest_request(request))
    assert header["inputs"] == [{"name": "x", "datatype": datatype, "shape": [1, 3],
                                 "parameters": {"binary_data_size": len(data)}}]
    assert data == np.asarray(values, dtype=dtype).tobytes()


def test_raw_contents_go_as_they_are_and_every_output_is_asked_as_binary():
    request = pb.ModelInferRequest(model_name="m", id="abc", raw_input_contents=[b"1234", b"xy"])
    request.inputs.add(name="a", datatype="FP32", shape=[1])
    request.inputs.add(name="b", datatype="FP16", shape=[1])
    request.inputs[1].parameters["note"].string_param = "kept"
    request.parameters["binary_data_output"].bool_param = False  # a JSON answer: overridden
    request.parameters["priority"].int64_param = 2
    request.outputs.add(name="y")
    header, data = split(rest_request(request))
    assert data == b"1234xy"
    assert header["id"] == "abc"
    assert header["inputs"][1]["parameters"] == {"note": "kept", "binary_data_size": 2}
    assert header["parameters"] == {"binary_data_output": True, "priority": 2}
    assert header["outputs"] == [{"name": "y", "parameters": {"binary_data": True}}]


def test_bytes_contents_are_length_prefixed():
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="s", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend([b"ab", b""])
    _, data = split(rest_request(request))
    assert data == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r.raw_input_contents.extend([b"a", b"b"]), "raw_input_contents has 2 entries"),
    (lambda r: (r.raw_input_contents.append(b"a"),
                r.inputs[0].contents.int_contents.append(1)), "use one or the other"),
    (lambda r: r.inputs[0].contents.int_contents.append(300), "does not fit INT8"),
    (lambda r: r.inputs[0].contents.fp32_contents.append(1.0), "contents are in fp32_contents"),
    (lambda r: setattr(r.inputs[0], "datatype", "FP16"), "no typed contents"),
])
def test_requests_that_cannot_be_sent_say_why(change, message):
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="INT8", shape=[1])
    change(request)
    with pytest.raises(GrpcCodecError, match=message):
        rest_request(request)


def test_a_binary_answer_becomes_raw_output_contents():
    scores = np.arange(6, dtype="<f4").reshape(2, 3)
    head = json.dumps({"model_name": "m", "model_version": "2", "id": "r", "outputs": [
        {"name": "y", "datatype": "FP32", "shape": [2, 3],
         "parameters": {"binary_data_size": scores.nbytes}},
        {"name": "z", "datatype": "INT64", "shape": [2], "data": [4, 5]}]}).encode()
    response = grpc_response(head + scores.tobytes(), len(head))
    assert (response.model_name, response.model_version, response.id) == ("m", "2", "r")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("y", "FP32", [2, 3]), ("z", "INT64", [2])]
    assert response.raw_output_contents[0] == scores.tobytes()
    assert response.raw_output_contents[1] == np.asarray([4, 5], dtype="<i8").tobytes()
    assert not response.outputs[0].HasField("contents")


def test_an_answer_shorter_than_its_outputs_is_an_error():
    head = json.dumps({"outputs": [{"name": "y", "datatype": "FP32", "shape": [4],
                                    "parameters": {"binary_data_size": 16}}]}).encode()
    with pytest.raises(ValueError, match="runs past the end"):
        grpc_response(head + b"\0" * 8, len(head))


@pytest.mark.parametrize(("status", "code"), [
    (400, grpc.StatusCode.INVALID_ARGUMENT), (401, grpc.StatusCode.UNAUTHENTICATED),
    (403, grpc.StatusCode.PERMISSION_DENIED), (404, grpc.StatusCode.NOT_FOUND),
    (413, grpc.StatusCode.RESOURCE_EXHAUSTED), (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (503, grpc.StatusCode.UNAVAILABLE), (504, grpc.StatusCode.DEADLINE_EXCEEDED),
    (500, grpc.StatusCode.INTERNAL), (502, grpc.StatusCode.INTERNAL),
])
def test_http_statuses_map_to_grpc_codes(status, code):
    assert grpc_code(status) == code


def test_error_details_are_the_message_or_the_text():
    assert error_details(b'{"error":"bad shape"}') == "bad shape"
    assert error_details(b"plain failure") == "plain failure"
    assert error_details(b"x" * 5000).endswith("...")
