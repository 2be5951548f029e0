"""The Open Inference Protocol v2 REST codec, independent of the transport.

Request bytes (and the value of the `Inference-Header-Content-Length` header) become a
typed InferRequest; `bind_to_signature` checks it against a model signature; typed
outputs become response bytes. Every malformed request raises CodecError, whose message
is meant for the client (HTTP 400).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.replica.codec_hints import binary_hint
from serving.replica.datatypes import (
    NUMPY_DTYPES,
    DataError,
    array_from_bytes,
    array_from_json,
    array_to_bytes,
    array_to_json,
)
from swarm_protocol.signature import Signature, TensorSpec
from swarm_protocol.wire_numbers import parse_count

HEADER_LENGTH_HEADER = "inference-header-content-length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"
MAX_RANK = 64  # numpy's limit (NPY_MAXDIMS): more dimensions cannot be an array at all
# Dimensions multiply to at most this (zeros counted as one): a zero-size tensor may still
# be shaped by the client, but not past what numpy can describe.
MAX_SHAPE_ELEMENTS = 2**40
# Non-finite floats in JSON outputs, spelt as proto3's JSON mapping does: bare NaN and
# Infinity are not JSON, and no strict parser accepts them.
NON_FINITE_TEXT = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


class CodecError(ValueError):
    """A request that does not follow the protocol or the model's signature (HTTP 400)."""


@dataclass(frozen=True)
class InputTensor:
    """One decoded request input."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray


@dataclass(frozen=True)
class OutputRequest:
    """One requested output; `binary` None means the request-level default applies."""

    name: str
    binary: bool | None


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request (not yet checked against a signature)."""

    request_id: str | None
    inputs: tuple[InputTensor, ...]
    outputs: tuple[OutputRequest, ...] | None  # None: all outputs
    binary_output: bool  # `parameters.binary_data_output`


@dataclass(frozen=True)
class BoundRequest:
    """A request checked against a signature: arrays in signature order, selected outputs."""

    arrays: tuple[np.ndarray, ...]
    rows: int
    outputs: tuple[tuple[int, bool], ...]  # (index into signature.outputs, as binary)


@dataclass(frozen=True)
class OutputTensor:
    """One output to send back."""

    name: str
    datatype: str
    array: np.ndarray
    binary: bool


@dataclass(frozen=True)
class EncodedResponse:
    """Response body, its content type and, for binary bodies, the JSON header's length."""

    body: bytes
    content_type: str
    json_length: int | None


def parse_header_length(value: str | bytes | None, body_bytes: int) -> int | None:
    """Return the Inference-Header-Content-Length value, or None when it is absent."""
    if value is None:
        return None
    length = parse_count(value)
    if length is None:
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        shown = text if len(text) <= 40 else f"{text[:40]}... ({len(text)} characters)"
        raise CodecError("Inference-Header-Content-Length must be a non-negative integer "
                         f"(the JSON header's length in bytes), got {shown!r}")
    if length == 0:
        raise CodecError("raw binary requests (Inference-Header-Content-Length: 0) "
                         "are not supported; send a JSON header")
    if length > body_bytes:
        raise CodecError(f"Inference-Header-Content-Length is {length} but the body has "
                         f"only {body_bytes} bytes")
    return length


class _BinarySection:
    """The bytes after the JSON header, handed out in order."""

    def __init__(self, body: bytes, json_length: int | None) -> None:
        self._present = json_length is not None
        self._view = memoryview(body)[json_length or len(body):]
        self._offset = 0

    def take(self, size_bytes: int, name: str) -> memoryview:
        if not self._present:
            raise CodecError(f"input {name!r} declares {size_bytes} bytes of binary data "
                             "(binary_data_size) but the request has no "
                             "Inference-Header-Content-Length header: set it to the length "
                             "of the JSON part of the body")
        end = self._offset + size_bytes
        if end > len(self._view):
            raise CodecError(f"input {name!r} declares {size_bytes} bytes of binary data but "
                             f"only {len(self._view) - self._offset} remain in the body")
        chunk = self._view[self._offset:end]
        self._offset = end
        return chunk

    def finish(self) -> None:
        left_bytes = len(self._view) - self._offset
        if left_bytes:
            raise CodecError(f"the body has {left_bytes} bytes of binary data that no input "
                             "claims (check binary_data_size)")


def decode_infer_request(body: bytes, json_length: int | None) -> InferRequest:
    """Return the request in `body`; `json_length` splits the JSON header from binary data."""
    header = _load_header(body, json_length)
    if not isinstance(header, dict):
        raise CodecError("the request body must be a JSON object")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise CodecError("id must be a string")
    parameters = _parameters(header.get("parameters"), "parameters")
    binary_output = _optional_bool(parameters, "binary_data_output", "parameters")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise CodecError("inputs must be a non-empty list")
    binary = _BinarySection(body, json_length)
    inputs = tuple(_decode_input(raw, i, binary) for i, raw in enumerate(raw_inputs))
    binary.finish()
    return InferRequest(request_id=request_id, inputs=inputs,
                        outputs=_decode_outputs(header.get("outputs")),
                        binary_output=bool(binary_output))


def _load_header(body: bytes, json_length: int | None) -> Any:
    try:
        return _load_json(body if json_length is None else body[:json_length])
    except CodecError as exc:
        hint = binary_hint(body, json_length)
        raise CodecError(f"{exc}; {hint}" if hint else str(exc)) from None


def _refuse_constant(token: str) -> Any:
    raise CodecError(f"{token} is not valid JSON (the JSON standard has no NaN or Infinity): "
                     "send non-finite values as binary data (JSON outputs spell them as the "
                     'strings "NaN", "Infinity" and "-Infinity")')


def _load_json(data: bytes) -> Any:
    try:
        return json.loads(data, parse_constant=_refuse_constant)
    except CodecError as exc:
        raise CodecError(f"the request body is not valid JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise CodecError(f"the request body is not valid JSON: {exc}") from None


def _parameters(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CodecError(f"{where} must be an object")
    return raw


def _optional_bool(parameters: dict[str, Any], key: str, where: str) -> bool | None:
    value = parameters.get(key)
    if value is not None and not isinstance(value, bool):
        raise CodecError(f"{where}.{key} must be true or false")
    return value


def _decode_input(raw: Any, index: int, binary: _BinarySection) -> InputTensor:
    where = f"inputs[{index}]"
    if not isinstance(raw, dict):
        raise CodecError(f"{where} must be an object with name, shape, datatype and data")
    name = raw.get("name")
    if not isinstance(name, str):
        raise CodecError(f"{where}.name must be a string")
    datatype = raw.get("datatype")
    if datatype not in NUMPY_DTYPES:
        raise CodecError(f"input {name!r}: datatype {datatype!r} is not supported "
                         f"(supported: {', '.join(NUMPY_DTYPES)})")
    shape = _decode_shape(raw.get("shape"), name)
    parameters = _parameters(raw.get("parameters"), f"{where}.parameters")
    if "shared_memory_region" in parameters:
        raise CodecError(f"input {name!r}: shared memory is not supported")
    try:
        array = _decode_data(raw, parameters, name, datatype, shape, binary)
    except DataError as exc:
        raise CodecError(f"input {name!r}: {exc}") from None
    return InputTensor(name=name, datatype=datatype, shape=shape, array=array)


def _decode_shape(raw: Any, name: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not raw:
        raise CodecError(f"input {name!r}: shape must be a non-empty list of integers")
    if len(raw) > MAX_RANK:
        raise CodecError(f"input {name!r}: shape has {len(raw)} dimensions, at most "
                         f"{MAX_RANK} are supported")
    elements = 1
    for dim in raw:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise CodecError(f"input {name!r}: shape must hold non-negative integers, "
                             f"got {raw}")
        elements *= max(dim, 1)
        if elements > MAX_SHAPE_ELEMENTS:
            raise CodecError(f"input {name!r}: shape {raw} has more than "
                             f"{MAX_SHAPE_ELEMENTS} elements")
    return tuple(raw)


def _decode_data(raw: dict[str, Any], parameters: dict[str, Any], name: str, datatype: str,
                 shape: tuple[int, ...], binary: _BinarySection) -> np.ndarray:
    size_bytes = parameters.get("binary_data_size")
    if size_bytes is None:
        if "data" not in raw:
            raise CodecError(f"input {name!r} has neither data nor binary_data_size")
        return array_from_json(raw["data"], datatype, shape)
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes < 0:
        raise CodecError(f"input {name!r}: binary_data_size must be a non-negative integer")
    if "data" in raw:
        raise CodecError(f"input {name!r} has both data and binary_data_size")
    return array_from_bytes(binary.take(size_bytes, name), datatype, shape)


def _decode_outputs(raw: Any) -> tuple[OutputRequest, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise CodecError("outputs must be a list")
    requested = []
    for index, item in enumerate(raw):
        where = f"outputs[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise CodecError(f"{where} must be an object with a name")
        parameters = _parameters(item.get("parameters"), f"{where}.parameters")
        if "classification" in parameters:
            raise CodecError("the classification extension is not supported")
        if "shared_memory_region" in parameters:
            raise CodecError(f"output {item['name']!r}: shared memory is not supported")
        binary = _optional_bool(parameters, "binary_data", f"{where}.parameters")
        requested.append(OutputRequest(name=item["name"], binary=binary))
    return tuple(requested)


def bind_to_signature(request: InferRequest, signature: Signature) -> BoundRequest:
    """Return the request's arrays in signature order, or raise CodecError saying why not."""
    by_name: dict[str, InputTensor] = {}
    for tensor in request.inputs:
        if tensor.name in by_name:
            raise CodecError(f"input {tensor.name!r} is given more than once")
        by_name[tensor.name] = tensor
    expected = [spec.name for spec in signature.inputs]
    unknown = [name for name in by_name if name not in expected]
    if unknown:
        raise CodecError(f"unknown input {unknown[0]!r}; the model's inputs are: "
                         f"{', '.join(expected)}")
    missing = [name for name in expected if name not in by_name]
    if missing:
        raise CodecError(f"missing input {missing[0]!r}; the model's inputs are: "
                         f"{', '.join(expected)}")
    arrays = tuple(_check_input(by_name[spec.name], spec) for spec in signature.inputs)
    return BoundRequest(arrays=arrays, rows=_batch_rows(request.inputs),
                        outputs=_select_outputs(request, signature))


def _check_input(tensor: InputTensor, spec: TensorSpec) -> np.ndarray:
    if tensor.datatype != spec.datatype:
        raise CodecError(f"input {spec.name!r} has datatype {tensor.datatype}, the model "
                         f"expects {spec.datatype}")
    if not spec.accepts_shape(tensor.shape):
        raise CodecError(f"input {spec.name!r} has shape {list(tensor.shape)}, the model "
                         f"expects {list(spec.shape)} (-1: any size)")
    return tensor.array


def _batch_rows(inputs: Sequence[InputTensor]) -> int:
    rows = {tensor.shape[0] for tensor in inputs}
    if len(rows) > 1:
        listed = ", ".join(f"{t.name}: {t.shape[0]}" for t in inputs)
        raise CodecError(f"the inputs' batch sizes (dimension 0) differ ({listed})")
    (batch_rows,) = rows
    if batch_rows < 1:
        raise CodecError("the batch dimension (dimension 0) must be at least 1")
    return batch_rows


def _select_outputs(request: InferRequest,
                    signature: Signature) -> tuple[tuple[int, bool], ...]:
    names = [spec.name for spec in signature.outputs]
    if request.outputs is None:
        return tuple((index, request.binary_output) for index in range(len(names)))
    selected: list[tuple[int, bool]] = []
    for wanted in request.outputs:
        if wanted.name not in names:
            raise CodecError(f"unknown output {wanted.name!r}; the model's outputs are: "
                             f"{', '.join(names)}")
        index = names.index(wanted.name)
        if any(index == taken for taken, _ in selected):
            raise CodecError(f"output {wanted.name!r} is requested more than once")
        binary = request.binary_output if wanted.binary is None else wanted.binary
        selected.append((index, binary))
    return tuple(selected)


def encode_infer_response(model_name: str, model_version: str, request_id: str | None,
                          outputs: Sequence[OutputTensor]) -> EncodedResponse:
    """Return the response body: JSON only, or a JSON header followed by binary outputs."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for output in outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype,
                                 "shape": list(output.array.shape)}
        if output.binary:
            data = array_to_bytes(output.array, output.datatype)
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            try:
                entry["data"] = array_to_json(output.array, output.datatype)
            except DataError as exc:
                raise CodecError(f"output {output.name!r}: {exc}") from None
        entries.append(entry)
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        header["id"] = request_id
    header["outputs"] = entries
    try:
        head = dump_json(header)
    except ValueError:  # a NaN or an infinity in a JSON output: rare, so only then a pass
        for entry in entries:
            if "data" in entry:
                entry["data"] = [_finite_or_text(value) for value in entry["data"]]
        head = dump_json(header)
    if not chunks:
        return EncodedResponse(body=head, content_type=JSON_CONTENT_TYPE, json_length=None)
    return EncodedResponse(body=head + b"".join(chunks), content_type=BINARY_CONTENT_TYPE,
                           json_length=len(head))


def _finite_or_text(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return NON_FINITE_TEXT[repr(value)]
    return value


def dump_json(value: Any) -> bytes:
    """Return compact, strict JSON bytes (ValueError on NaN or infinities: not JSON)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def error_body(message: str) -> bytes:
    """Return the OIP error body {"error": message}."""
    return dump_json({"error": message})
