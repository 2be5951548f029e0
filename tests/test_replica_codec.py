"""The OIP codec on its own: no server, no torch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving.replica import codec
from serving.replica.codec import CodecError, OutputTensor
from serving.replica.datatypes import bf16_bits_to_float32, float32_to_bf16_bits
from swarm_protocol.signature import parse_signature
from tests.replica_models import RECOMMENDER_SIGNATURE

SIGNATURE = parse_signature(RECOMMENDER_SIGNATURE)


def json_input(name, datatype, shape, data):
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def ids(rows=1):
    return json_input("item_ids", "INT64", [rows, 8], list(range(8 * rows)))


def dense(rows=1, data=None):
    return json_input("dense", "FP32", [rows, 4], data or [0.5] * (4 * rows))


def decode(header: dict, binary: bytes = b"") -> codec.InferRequest:
    head = json.dumps(header).encode()
    return codec.decode_infer_request(head + binary, len(head) if binary else None)


def bind(header: dict, binary: bytes = b"") -> codec.BoundRequest:
    return codec.bind_to_signature(decode(header, binary), SIGNATURE)


def test_nested_and_flat_json_data_decode_alike():
    nested = bind({"inputs": [json_input("item_ids", "INT64", [2, 8],
                                         [list(range(8)), list(range(8, 16))]), dense(2)]})
    flat = bind({"inputs": [ids(2), dense(2)]})
    assert nested.rows == flat.rows == 2
    np.testing.assert_array_equal(nested.arrays[0], flat.arrays[0])
    assert nested.arrays[0].dtype == np.int64 and nested.arrays[1].dtype == np.float32


def test_inputs_are_bound_in_signature_order_and_all_outputs_default_to_json():
    bound = bind({"inputs": [dense(), ids()]})
    assert bound.arrays[0].shape == (1, 8) and bound.arrays[1].shape == (1, 4)
    assert bound.outputs == ((0, False), (1, False))


def test_binary_inputs_are_read_in_order_after_the_json_header():
    id_bytes = np.arange(8, dtype="<i8").tobytes()
    dense_bytes = np.array([1, 2, 3, 4], dtype="<f4").tobytes()
    header = {"inputs": [
        {"name": "item_ids", "datatype": "INT64", "shape": [1, 8],
         "parameters": {"binary_data_size": len(id_bytes)}},
        {"name": "dense", "datatype": "FP32", "shape": [1, 4],
         "parameters": {"binary_data_size": len(dense_bytes)}}],
        "outputs": [{"name": "top_item", "parameters": {"binary_data": True}}]}
    bound = bind(header, id_bytes + dense_bytes)
    np.testing.assert_array_equal(bound.arrays[1], [[1, 2, 3, 4]])
    assert bound.outputs == ((1, True),)


def test_request_level_binary_output_applies_unless_an_output_says_otherwise():
    request = {"inputs": [ids(), dense()], "parameters": {"binary_data_output": True},
               "outputs": [{"name": "score", "parameters": {"binary_data": False}},
                           {"name": "top_item"}]}
    assert bind(request).outputs == ((0, False), (1, True))


@pytest.mark.parametrize(("header", "message"), [
    ({"inputs": [ids(), dense(), json_input("extra", "FP32", [1], [1])]}, "unknown input"),
    ({"inputs": [ids()]}, "missing input 'dense'"),
    ({"inputs": [ids(), dense(), dense()]}, "more than once"),
    ({"inputs": [json_input("item_ids", "INT32", [1, 8], list(range(8))), dense()]},
     "has datatype INT32, the model expects INT64"),
    ({"inputs": [json_input("item_ids", "INT64", [1, 7], list(range(7))), dense()]},
     "has shape [1, 7]"),
    ({"inputs": [json_input("item_ids", "INT64", [8], list(range(8))), dense()]},
     "has shape [8]"),
    ({"inputs": [ids(2), dense(1)]}, "batch sizes"),
    ({"inputs": [json_input("item_ids", "INT64", [1, 8], list(range(7))), dense()]},
     "7 elements"),
    ({"inputs": [json_input("item_ids", "INT64", [0, 8], []),
                 json_input("dense", "FP32", [0, 4], [])]}, "at least 1"),
    ({"inputs": [ids(), dense(data=["a", "b", "c", "d"])]}, "not FP32 numbers"),
    ({"inputs": [ids(), dense(data=[[1, 2], [3]])]}, "ragged"),
    ({"inputs": [json_input("item_ids", "INT64", [1, 8], [0.5] * 8), dense()]}, "integers"),
    ({"inputs": [json_input("item_ids", "INT64", [1, -8], list(range(8))), dense()]},
     "non-negative"),
    ({"inputs": [json_input("item_ids", "UINT128", [1, 8], list(range(8))), dense()]},
     "not supported"),
    ({"inputs": [ids(), dense()], "outputs": [{"name": "nope"}]}, "unknown output 'nope'"),
    ({"inputs": [ids(), dense()], "id": 7}, "id must be a string"),
    ({"inputs": []}, "non-empty list"),
    ({"inputs": [ids(), {"name": "dense", "datatype": "FP32", "shape": [1, 4]}]},
     "neither data nor binary_data_size"),
    ({"inputs": [ids(), dense()], "parameters": {"binary_data_output": "yes"}},
     "true or false"),
])
def test_bad_requests_raise_a_clear_codec_error(header, message):
    with pytest.raises(CodecError) as caught:
        bind(header)
    assert message in str(caught.value)


@pytest.mark.parametrize(("body", "length", "message"), [
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
])
def test_malformed_bodies_raise_a_codec_error(body, length, message):
    with pytest.raises(CodecError, match=message):
        codec.decode_infer_request(body, length)


def test_binary_sizes_that_do_not_add_up_are_refused():
    header = {"inputs": [{"name": "dense", "datatype": "FP32", "shape": [1, 4],
                          "parameters": {"binary_data_size": 16}}]}
    with pytest.raises(CodecError, match="only 8 remain"):
        decode(header, b"\0" * 8)
    with pytest.raises(CodecError, match="that no input claims"):
        decode(header, b"\0" * 20)
    header["inputs"][0]["parameters"]["binary_data_size"] = 12
    with pytest.raises(CodecError, match="needs 16"):
        decode(header, b"\0" * 12)
    with pytest.raises(CodecError, match="no Inference-Header-Content-Length"):
        codec.decode_infer_request(json.dumps(header).encode(), None)


@pytest.mark.parametrize(("value", "message"), [
    (b"abc", "must be a non-negative integer"), (b"0", "raw binary"), (b"999", "only 10 bytes")])
def test_bad_header_lengths_are_refused(value, message):
    with pytest.raises(CodecError, match=message):
        codec.parse_header_length(value, 10)


def test_out_of_range_integers_are_refused_not_wrapped():
    signature = parse_signature({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [-1]}],
                                 "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}]})
    with pytest.raises(CodecError, match=r"\[0, 255\]"):
        decode({"inputs": [json_input("x", "UINT8", [2], [1, 300])]})
    request = decode({"inputs": [json_input("x", "UINT8", [2], [1, 255])]})
    bound = codec.bind_to_signature(request, signature)
    assert bound.arrays[0].dtype == np.uint8


def test_bool_and_bf16_decode_from_json_and_binary():
    request = decode({"inputs": [json_input("flags", "BOOL", [3], [True, False, 1]),
                                 json_input("half", "BF16", [2], [1.5, -2.0])]})
    np.testing.assert_array_equal(request.inputs[0].array, [True, False, True])
    np.testing.assert_array_equal(bf16_bits_to_float32(request.inputs[1].array), [1.5, -2.0])
    binary = np.array([1, 0, 1], dtype=np.uint8).tobytes()
    header = {"inputs": [{"name": "flags", "datatype": "BOOL", "shape": [3],
                          "parameters": {"binary_data_size": 3}}]}
    assert decode(header, binary).inputs[0].array.tolist() == [True, False, True]


def test_bf16_rounds_to_nearest_even_and_keeps_nan():
    values = np.array([1.0, 1.00390625, 1.01171875, np.nan, -0.0], dtype=np.float32)
    bits = float32_to_bf16_bits(values)
    back = bf16_bits_to_float32(bits)
    assert back[0] == 1.0 and back[1] == 1.0 and back[2] == 1.015625
    assert np.isnan(back[3]) and back[4] == 0.0


def test_a_json_response_echoes_the_id_and_lists_flat_data():
    encoded = codec.encode_infer_response("rec", "3", "req-1", [
        OutputTensor("score", "FP32", np.array([[0.5], [1.5]], dtype=np.float32), False)])
    assert encoded.content_type == "application/json" and encoded.json_length is None
    assert json.loads(encoded.body) == {
        "model_name": "rec", "model_version": "3", "id": "req-1",
        "outputs": [{"name": "score", "datatype": "FP32", "shape": [2, 1], "data": [0.5, 1.5]}]}


def test_a_binary_response_puts_raw_bytes_after_the_json_header():
    top = np.array([[7], [9]], dtype=np.int64)
    encoded = codec.encode_infer_response("rec", "3", None, [
        OutputTensor("top_item", "INT64", top, True),
        OutputTensor("score", "FP32", np.zeros((2, 1), np.float32), False)])
    assert encoded.content_type == "application/octet-stream"
    header = json.loads(encoded.body[:encoded.json_length])
    assert "id" not in header
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 16}
    assert "data" not in header["outputs"][0] and header["outputs"][1]["data"] == [0.0, 0.0]
    assert np.frombuffer(encoded.body[encoded.json_length:], "<i8").tolist() == [7, 9]
