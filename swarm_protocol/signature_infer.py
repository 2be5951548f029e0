"""Signatures read from the model file itself, and declared ones checked against them.

ONNX graphs name their inputs and outputs with types and shapes (symbolic dimensions
become -1); a torch.export program keeps its example inputs' shapes and dtypes (dynamic
dimensions become -1); a TorchScript module says neither, so the uploader gives the
inputs once (`example_input`) and the outputs are observed from two forward passes (the
dimensions that change with the variable inputs' size become -1).

The comparison and the ONNX part are pure (protobuf objects in, Signature out); the
torch parts take already-loaded objects and only read their attributes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from swarm_protocol.signature import (
    DATATYPES,
    Signature,
    SignatureError,
    TensorSpec,
    parse_signature,
    parse_tensor_spec,
)

# onnx.TensorProto.DataType -> OIP datatype (the types our serving path carries).
ONNX_ELEM_TO_DATATYPE = {1: "FP32", 2: "UINT8", 3: "INT8", 5: "INT16", 6: "INT32",
                         7: "INT64", 9: "BOOL", 10: "FP16", 11: "FP64", 16: "BF16"}
ONNX_ELEM_NAMES = {4: "UINT16", 8: "STRING", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64",
                   15: "COMPLEX128", 17: "FLOAT8E4M3FN"}
MAX_EXAMPLE_TENSORS = 64


class SignatureMismatch(ValueError):
    """A declared signature disagrees with the file; the message names the tensor."""


# --- ONNX ---------------------------------------------------------------------------------

def onnx_signature(model: Any) -> Signature:
    """Return the graph's signature (inputs that are initializers left out); -1 = symbolic."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    raw = {"inputs": [_onnx_spec(value, "input") for value in inputs],
           "outputs": [_onnx_spec(value, "output") for value in model.graph.output]}
    try:
        return parse_signature(raw)
    except SignatureError as exc:
        raise SignatureError(f"the signature read from the ONNX graph is not usable: {exc}") \
            from None


def _onnx_spec(value: Any, kind: str) -> dict[str, Any]:
    if value.type.WhichOneof("value") != "tensor_type":
        raise SignatureError(f"ONNX {kind} {value.name!r} is not a tensor "
                             f"({value.type.WhichOneof('value')})")
    tensor_type = value.type.tensor_type
    elem = tensor_type.elem_type
    if elem not in ONNX_ELEM_TO_DATATYPE:
        name = ONNX_ELEM_NAMES.get(elem, str(elem))
        raise SignatureError(f"ONNX {kind} {value.name!r} has element type {name}, which the "
                             f"serving path does not carry")
    if not tensor_type.HasField("shape"):
        raise SignatureError(f"ONNX {kind} {value.name!r} has no shape: give a signature")
    shape = [dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else -1
             for dim in tensor_type.shape.dim]
    return {"name": value.name, "datatype": ONNX_ELEM_TO_DATATYPE[elem], "shape": shape}


# --- torch --------------------------------------------------------------------------------

def torch_datatype(dtype: Any) -> str:
    """Return the OIP datatype of a torch dtype, or raise SignatureError."""
    name = str(dtype).removeprefix("torch.")
    for datatype, (torch_name, _) in DATATYPES.items():
        if torch_name == name:
            return datatype
    raise SignatureError(f"the dtype {name} has no Open Inference Protocol datatype here")


def _spec_of(name: str, value: Any) -> dict[str, Any]:
    """Return a spec dict for a (fake) tensor; symbolic sizes (SymInt) become -1."""
    shape = [dim if isinstance(dim, int) else -1 for dim in value.shape]
    return {"name": name, "datatype": torch_datatype(value.dtype), "shape": shape}


def output_names(out_spec: Any, count: int) -> list[str]:
    """Return output names: the keys of a dict output, else output_0, output_1, ..."""
    if getattr(out_spec, "type", None) is dict and len(out_spec.context) == count:
        return [str(key) for key in out_spec.context]
    return [f"output_{i}" for i in range(count)]


def export_signature(program: Any) -> Signature:
    """Return a torch.export program's signature from its example shapes and dtypes."""
    nodes = {node.name: node for node in program.graph.nodes}
    inputs = [_spec_of(name, nodes[name].meta["val"])
              for name in program.graph_signature.user_inputs]
    output_node = next(node for node in program.graph.nodes if node.op == "output")
    values = [arg.meta["val"] for arg in output_node.args[0]
              if getattr(arg, "name", None) in program.graph_signature.user_outputs]
    names = output_names(program.call_spec.out_spec, len(values))
    outputs = [_spec_of(name, value) for name, value in zip(names, values, strict=True)]
    return parse_signature({"inputs": inputs, "outputs": outputs})


def parse_example_input(raw: Any) -> tuple[TensorSpec, ...]:
    """Return input specs from [{"name", "datatype", "shape"}, ...] (or {"inputs": [...]})."""
    if isinstance(raw, dict) and set(raw) == {"inputs"}:
        raw = raw["inputs"]
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_EXAMPLE_TENSORS:
        raise SignatureError("example_input must be a list of 1 to 64 "
                             '{"name", "datatype", "shape"} objects (shape: -1 = variable)')
    return tuple(parse_tensor_spec(item, f"example_input[{i}]") for i, item in enumerate(raw))


def observed_signature(inputs: Sequence[TensorSpec], small: Sequence[Any],
                       large: Sequence[Any], names: Sequence[str]) -> Signature:
    """Return a signature from outputs seen with variable dims at 1 (small) and 2 (large).

    A dimension that differs between the two runs follows the input and becomes -1.
    """
    if len(small) != len(large):
        raise SignatureError("the model returned a different number of outputs per size")
    outputs = []
    for name, one, two in zip(names, small, large, strict=True):
        spec = _spec_of(name, one)
        if len(one.shape) != len(two.shape):
            raise SignatureError(f"output {name!r} changes rank with the input size")
        spec["shape"] = [-1 if a != b else a for a, b in zip(one.shape, two.shape, strict=True)]
        outputs.append(spec)
    return parse_signature({"inputs": [spec.to_dict() for spec in inputs], "outputs": outputs})


# --- declared against inferred ----------------------------------------------------------

def check_declared(declared: Signature, inferred: Signature, *, names_matter: bool) -> None:
    """Raise SignatureMismatch where the declaration contradicts the file.

    A declared fixed size is allowed where the file says -1 (a narrower promise); a
    declared -1 where the file fixes the size is not. Names are compared only where the
    runtime binds by name (ONNX); torch takes tensors by position.
    """
    for kind in ("inputs", "outputs"):
        mine, theirs = getattr(declared, kind), getattr(inferred, kind)
        if len(mine) != len(theirs):
            raise SignatureMismatch(
                f"the signature declares {len(mine)} {kind} but the model has {len(theirs)} "
                f"({', '.join(spec.name for spec in theirs)})")
        for want, have in zip(mine, theirs, strict=True):
            _check_spec(kind[:-1], want, have, names_matter)


def _check_spec(kind: str, want: TensorSpec, have: TensorSpec, names_matter: bool) -> None:
    label = f"{kind} {want.name!r}"
    if names_matter and want.name != have.name:
        raise SignatureMismatch(f"{label}: the model's {kind} at that position is "
                                f"{have.name!r}")
    if want.datatype != have.datatype:
        raise SignatureMismatch(f"{label} is declared {want.datatype}, the model's is "
                                f"{have.datatype}")
    if not _shape_fits(want.shape, have.shape):
        raise SignatureMismatch(f"{label} is declared with shape {list(want.shape)}, the "
                                f"model's is {list(have.shape)}")


def _shape_fits(declared: Iterable[int], inferred: Iterable[int]) -> bool:
    declared, inferred = list(declared), list(inferred)
    return len(declared) == len(inferred) and all(
        have == -1 or want == have for want, have in zip(declared, inferred, strict=True))
