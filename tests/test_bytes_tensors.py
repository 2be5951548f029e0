"""BYTES tensors in the codec (JSON strings, 4-byte length-prefixed binary elements), and
FP16/BF16/BYTES through a real replica and the gateway with tritonclient.http."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.signature import parse_signature
from serving.replica import codec
from serving.replica.codec import CodecError, OutputTensor
from serving.replica.datatypes import (
    MAX_BYTES_ELEMENT_BYTES,
    MAX_BYTES_ELEMENTS,
    bytes_from_buffer,
    bytes_to_buffer,
)

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
