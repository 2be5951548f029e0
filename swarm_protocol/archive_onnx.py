"""The ONNX part of the archive inspector: parse a model without loading anything it names.

An ONNX file is a protobuf; what makes one dangerous is what it points at, not what it
holds: external data (a path, read by the runtime next to the model or anywhere), and
operators of a custom domain that only a shared library can run. So: the file is read
whole under a size cap (no external data is ever followed), parsed with the `onnx`
package, checked with `onnx.checker`, and refused if any tensor anywhere (initializers,
constants, subgraphs, functions) lives outside the file, if a node's domain is not one
ONNX Runtime implements itself, or if a tensor declares more bytes than the limits.

No Django and no torch; `onnx` is imported when an ONNX file is inspected.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from swarm_protocol.archive_export import ArchiveRefused

# Domains ONNX Runtime implements in its own binary; anything else needs a custom-op
# library, which we never register.
BUILTIN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
# Built in, yet pointing outside the file: an EPContext node names a compiled blob by path.
DENIED_OPERATORS = frozenset({("com.microsoft", "EPContext")})
PROTOBUF_MAX_BYTES = 2**31 - 1  # a single protobuf message cannot be larger
MIN_IR_VERSION = 3  # the first with opset imports


@dataclass(frozen=True)
class OnnxInspection:
    """A parsed model that passed every check, with what the registry records of it."""

    model: Any  # onnx.ModelProto
    content: bytes
    opset: int
    producer: str


def read_capped(source: str | IO[bytes], max_bytes: int) -> bytes:
    """Return the whole file, or raise ArchiveRefused once it passes `max_bytes`."""
    if isinstance(source, str):
        with open(source, "rb") as handle:
            content = handle.read(max_bytes + 1)
    else:
        source.seek(0)
        content = source.read(max_bytes + 1)
    if len(content) > max_bytes:
        raise ArchiveRefused(f"the ONNX file is larger than {max_bytes} bytes "
                             "(ARCHIVE_MAX_UNCOMPRESSED_BYTES, or protobuf's 2 GiB)")
    return content


def parse_model(content: bytes) -> Any:
    """Return the ModelProto, or raise ArchiveRefused when the bytes are not an ONNX model."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model_from_string(content)  # never follows external data
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ArchiveRefused(f"the file is not an ONNX model: {exc}") from None
    if model.ir_version < MIN_IR_VERSION or not model.graph.output or not model.opset_import:
        raise ArchiveRefused("the file is not an ONNX model (no IR version, opset or outputs)")
    return model


def inspect_onnx(source: str | IO[bytes], max_bytes: int,
                 max_tensor_bytes: int) -> OnnxInspection:
    """Return the checked model; raise ArchiveRefused naming what is refused."""
    content = read_capped(source, min(max_bytes, PROTOBUF_MAX_BYTES))
    model = parse_model(content)
    if len(model.training_info):
        raise ArchiveRefused("the ONNX model carries training graphs (training_info)")
    check_domains(model)
    check_tensors(model, max_tensor_bytes)
    _check_model(model)
    return OnnxInspection(model=model, content=content, opset=default_opset(model),
                          producer=producer_of(model))


def _check_model(model: Any) -> None:
    import onnx

    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or ["invalid"])[0][:300]
        raise ArchiveRefused(f"the ONNX model is invalid: {first}") from None


def default_opset(model: Any) -> int:
    """Return the model's ai.onnx opset version (0 when it imports none)."""
    return max((entry.version for entry in model.opset_import
                if entry.domain in ("", "ai.onnx")), default=0)


def producer_of(model: Any) -> str:
    """Return 'name version' of the tool that wrote the model (may be empty)."""
    return f"{model.producer_name} {model.producer_version}".strip()[:200]


def check_domains(model: Any) -> None:
    """Refuse operator domains that ONNX Runtime would need a custom-op library for."""
    local = {(function.domain, function.name) for function in model.functions}
    local_domains = {domain for domain, _ in local}
    for entry in model.opset_import:
        if entry.domain not in BUILTIN_DOMAINS and entry.domain not in local_domains:
            raise ArchiveRefused(
                f"the ONNX model imports the custom operator domain {entry.domain!r}, which "
                "needs a shared library (only ai.onnx, ai.onnx.ml and com.microsoft are run)")
    for node in all_nodes(model):
        if (node.domain, node.op_type) in DENIED_OPERATORS:
            raise ArchiveRefused(f"the ONNX node {node.name or node.op_type!r} is a "
                                 f"{node.domain}.{node.op_type}, which loads a file by path")
        if node.domain not in BUILTIN_DOMAINS and (node.domain, node.op_type) not in local:
            raise ArchiveRefused(
                f"the ONNX node {node.name or node.op_type!r} uses the custom operator "
                f"{node.domain}.{node.op_type}, which needs a shared library")


def check_tensors(model: Any, max_tensor_bytes: int) -> None:
    """Refuse external data anywhere, and tensors that declare more than the limit."""
    total_bytes = 0
    for tensor in all_tensors(model):
        if tensor.data_location == 1 or len(tensor.external_data):  # TensorProto.EXTERNAL
            where = {entry.key: entry.value for entry in tensor.external_data}.get("location")
            raise ArchiveRefused(
                f"the ONNX tensor {tensor.name!r} refers to external data ({where!r}); "
                "upload a single .onnx file with its weights inside")
        declared = declared_bytes(tensor)
        total_bytes += declared
        if declared > max_tensor_bytes or total_bytes > max_tensor_bytes:
            raise ArchiveRefused(
                f"the ONNX tensor {tensor.name!r} brings the declared weights above "
                f"{max_tensor_bytes} bytes (ARCHIVE_MAX_UNCOMPRESSED_BYTES)")


def declared_bytes(tensor: Any) -> int:
    """Return the bytes a tensor's dims declare (strings count one byte each)."""
    from onnx import helper

    count = 1
    for dim in tensor.dims:
        if dim < 0:
            raise ArchiveRefused(f"the ONNX tensor {tensor.name!r} has a negative dimension")
        count *= dim
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        itemsize = 1
    return int(count * max(itemsize, 1))


def all_graphs(model: Any) -> Iterator[Any]:
    """Yield the main graph and every subgraph (If, Loop, Scan bodies, in functions too)."""
    pending = [model.graph, *(graph for function in model.functions
                              for node in function.node for graph in _subgraphs(node))]
    while pending:
        graph = pending.pop()
        yield graph
        for node in graph.node:
            pending.extend(_subgraphs(node))


def _subgraphs(node: Any) -> Iterator[Any]:
    for attribute in node.attribute:
        if attribute.HasField("g"):
            yield attribute.g
        yield from attribute.graphs


def all_nodes(model: Any) -> Iterator[Any]:
    """Yield every node of every graph and function."""
    for graph in all_graphs(model):
        yield from graph.node
    for function in model.functions:
        yield from function.node


def all_tensors(model: Any) -> Iterator[Any]:
    """Yield every TensorProto: initializers, sparse parts and tensor attributes."""
    for graph in all_graphs(model):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
    for node in all_nodes(model):
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                yield attribute.sparse_tensor.values
                yield attribute.sparse_tensor.indices
            for sparse in attribute.sparse_tensors:
                yield sparse.values
                yield sparse.indices
