"""OIP v2 gRPC messages <-> the replica's REST binary-tensor requests and answers (pure).

A ModelInferRequest becomes one REST body: a JSON header naming every input with its
`binary_data_size`, followed by the tensors' bytes (`raw_input_contents` as they are, typed
`contents` packed little-endian), and asking for every output as binary data; the replica's
binary answer becomes a ModelInferResponse with `raw_output_contents`. The gateway still
parses no tensor: the replica checks datatypes, shapes and sizes, and its 400 comes back
as INVALID_ARGUMENT with its message.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc

from serving.gateway.proto import grpc_predict_v2_pb2 as pb

# One table from the gateway's HTTP statuses to gRPC codes; anything else is INTERNAL.
GRPC_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    431: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# Typed `contents` field and `struct` format per OIP datatype (FP16 and BF16 have no
# typed field: they travel only as raw contents). struct, not numpy: the gateway process
# stays free of numpy (asserted in tests/test_gateway_units.py).
TYPED_CONTENTS: dict[str, tuple[str, str]] = {
    "BOOL": ("bool_contents", "?"),
    "INT8": ("int_contents", "b"), "INT16": ("int_contents", "h"),
    "INT32": ("int_contents", "i"), "INT64": ("int64_contents", "q"),
    "UINT8": ("uint_contents", "B"), "UINT16": ("uint_contents", "H"),
    "UINT32": ("uint_contents", "I"), "UINT64": ("uint64_contents", "Q"),
    "FP32": ("fp32_contents", "f"), "FP64": ("fp64_contents", "d"),
}
MAX_DETAILS_CHARS = 1000  # of a non-JSON error body quoted back to the client


class GrpcCodecError(ValueError):
    """A ModelInferRequest that cannot become a REST request (INVALID_ARGUMENT)."""


def grpc_code(status: int) -> grpc.StatusCode:
    """Return the gRPC status code for a gateway or replica HTTP status."""
    return GRPC_CODES.get(status, grpc.StatusCode.INTERNAL)


def error_details(body: bytes) -> str:
    """Return the message of an OIP error body ({"error": message}), else the body's text."""
    try:
        value = json.loads(body)
    except ValueError:
        value = None
    if isinstance(value, dict) and isinstance(value.get("error"), str):
        message: str = value["error"]
        return message
    text = body.decode("utf-8", "replace")
    return text if len(text) <= MAX_DETAILS_CHARS else f"{text[:MAX_DETAILS_CHARS]}..."


def rest_request(request: pb.ModelInferRequest) -> tuple[bytes, int]:
    """Return the REST binary body for a ModelInferRequest and its JSON header's length;
    raise GrpcCodecError when the request's tensors cannot be sent."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise GrpcCodecError(f"raw_input_contents has {len(raw)} entries but the request "
                             f"has {len(request.inputs)} inputs: give one per input")
    inputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for index, tensor in enumerate(request.inputs):
        if raw and tensor.HasField("contents"):
            raise GrpcCodecError(f"input {tensor.name!r} has contents, but the request uses "
                                 "raw_input_contents: use one or the other")
        data = raw[index] if raw else _typed_bytes(tensor)
        parameters = _parameters(tensor.parameters)
        parameters["binary_data_size"] = len(data)
        inputs.append({"name": tensor.name, "datatype": tensor.datatype,
                       "shape": list(tensor.shape), "parameters": parameters})
        chunks.append(data)
    header: dict[str, Any] = {"inputs": inputs}
    if request.id:
        header["id"] = request.id
    header["parameters"] = {**_parameters(request.parameters), "binary_data_output": True}
    if request.outputs:
        header["outputs"] = [
            {"name": output.name,
             "parameters": {**_parameters(output.parameters), "binary_data": True}}
            for output in request.outputs]
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([head, *chunks]), len(head)


def _typed_bytes(tensor: pb.ModelInferRequest.InferInputTensor) -> bytes:
    """Return a tensor's typed `contents` as raw little-endian bytes."""
    contents = tensor.contents
    if tensor.datatype == "BYTES":
        # OIP's raw BYTES layout: each element as a 4-byte little-endian length, then it.
        return b"".join(struct.pack("<I", len(item)) + item
                        for item in contents.bytes_contents)
    typed = TYPED_CONTENTS.get(tensor.datatype)
    if typed is None:
        raise GrpcCodecError(f"input {tensor.name!r}: datatype {tensor.datatype!r} has no "
                             "typed contents; send it in raw_input_contents")
    field, code = typed
    for other in _set_fields(contents):
        if other != field:
            raise GrpcCodecError(f"input {tensor.name!r} is {tensor.datatype} but its "
                                 f"contents are in {other} (expected {field})")
    try:
        return _packed(code, getattr(contents, field))
    except struct.error as exc:
        raise GrpcCodecError(f"input {tensor.name!r}: {field} does not fit "
                             f"{tensor.datatype}: {exc}") from None


def _packed(code: str, values: Sequence[Any]) -> bytes:
    """Return values packed little-endian, row-major, no padding; raise struct.error."""
    return struct.pack(f"<{len(values)}{code}", *values)


def _set_fields(contents: pb.InferTensorContents) -> Iterable[str]:
    return (descriptor.name for descriptor, _ in contents.ListFields())


def _parameters(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """Return gRPC InferParameters as the JSON values REST uses."""
    values: dict[str, Any] = {}
    for name, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            values[name] = getattr(parameter, choice)
    return values


def grpc_response(body: bytes, json_length: int | None) -> pb.ModelInferResponse:
    """Return the ModelInferResponse for a replica's 200 answer (a JSON header, then the
    outputs' bytes); raise ValueError when the answer is not one."""
    header = json.loads(body if json_length is None else body[:json_length])
    response = pb.ModelInferResponse(model_name=header.get("model_name", ""),
                                     model_version=header.get("model_version", ""),
                                     id=header.get("id", ""))
    offset = len(body) if json_length is None else json_length
    for output in header["outputs"]:
        shape = [int(dim) for dim in output["shape"]]
        response.outputs.add(name=output["name"], datatype=output["datatype"], shape=shape)
        size_bytes = (output.get("parameters") or {}).get("binary_data_size")
        if size_bytes is None:  # asked as binary, but answered in JSON: pack it here
            response.raw_output_contents.append(_json_bytes(output))
            continue
        end = offset + int(size_bytes)
        if end > len(body):
            raise ValueError(f"output {output['name']!r} runs past the end of the answer")
        response.raw_output_contents.append(body[offset:end])
        offset = end
    return response


def _json_bytes(output: Mapping[str, Any]) -> bytes:
    typed = TYPED_CONTENTS.get(output["datatype"])
    if typed is None:
        raise ValueError(f"output {output['name']!r} came as JSON {output['datatype']}")
    data = output["data"]
    if not isinstance(data, list):
        raise ValueError(f"output {output['name']!r} has no data list")
    return _packed(typed[1], data)
