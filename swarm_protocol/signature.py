"""Model signatures in Open Inference Protocol terms (pure: no Django, no torch).

Shared by the portal (validation of what users declare), the validation child
and, later, the replica server, so it imports nothing heavier than the stdlib.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# OIP datatype -> (torch dtype name, bytes per element). BYTES (variable-length byte
# strings) has no torch dtype: a torch model meets them only through a version's steps.
DATATYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "UINT8": ("uint8", 1),
    "UINT16": ("uint16", 2),
    "UINT32": ("uint32", 4),
    "UINT64": ("uint64", 8),
    "INT8": ("int8", 1),
    "INT16": ("int16", 2),
    "INT32": ("int32", 4),
    "INT64": ("int64", 8),
    "FP16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "FP32": ("float32", 4),
    "FP64": ("float64", 8),
    "BYTES": ("", 0),
}
TORCH_DTYPE_TO_DATATYPE = {torch_name: oip for oip, (torch_name, _) in DATATYPES.items()
                           if torch_name}
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:\-]{0,127}$")
MAX_RANK = 8
MAX_TENSORS = 64


class SignatureError(ValueError):
    """A signature that is not well formed; the message says which part and why."""


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: OIP datatype and shape (-1 = variable, dim 0 = batch)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def concrete_shape(self, variable_dim: int = 1) -> tuple[int, ...]:
        """Return the shape with every variable dimension set to `variable_dim`."""
        return tuple(variable_dim if dim == -1 else dim for dim in self.shape)

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        """Return whether a concrete shape fits this spec (same rank, fixed dims equal)."""
        if len(shape) != len(self.shape):
            return False
        return all(want in (-1, got) for want, got in zip(self.shape, shape, strict=True))


@dataclass(frozen=True)
class Signature:
    """A model's inputs and outputs, in order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
        }


def parse_tensor_spec(raw: Any, where: str) -> TensorSpec:
    """Return a TensorSpec from a JSON-like dict, or raise SignatureError naming `where`."""
    if not isinstance(raw, dict):
        raise SignatureError(f"{where} must be an object with name, datatype and shape")
    unknown = set(raw) - {"name", "datatype", "shape"}
    if unknown:
        raise SignatureError(f"{where} has unknown keys: {', '.join(sorted(unknown))}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SignatureError(f"{where}.name must be an identifier-like string, got {name!r}")
    datatype = raw.get("datatype")
    if datatype not in DATATYPES:
        allowed = ", ".join(DATATYPES)
        raise SignatureError(f"{where}.datatype must be one of {allowed}, got {datatype!r}")
    return TensorSpec(name=name, datatype=datatype, shape=_parse_shape(raw.get("shape"), where))


def _parse_shape(shape: Any, where: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_RANK:
        raise SignatureError(f"{where}.shape must be a list of 1 to {MAX_RANK} integers")
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or (dim < 1 and dim != -1):
            raise SignatureError(f"{where}.shape entries must be positive integers or -1")
    return tuple(shape)


def _parse_specs(raw: Any, kind: str) -> tuple[TensorSpec, ...]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_TENSORS:
        raise SignatureError(f"{kind} must be a list of 1 to {MAX_TENSORS} tensors")
    specs = tuple(parse_tensor_spec(item, f"{kind}[{i}]") for i, item in enumerate(raw))
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SignatureError(f"{kind} names must be unique: {', '.join(duplicates)} repeated")
    return specs


def parse_signature(raw: Any) -> Signature:
    """Return a Signature from {"inputs": [...], "outputs": [...]}, or raise SignatureError."""
    if not isinstance(raw, dict):
        raise SignatureError("signature must be an object with inputs and outputs")
    unknown = set(raw) - {"inputs", "outputs"}
    if unknown:
        raise SignatureError(f"signature has unknown keys: {', '.join(sorted(unknown))}")
    return Signature(
        inputs=_parse_specs(raw.get("inputs"), "inputs"),
        outputs=_parse_specs(raw.get("outputs"), "outputs"),
    )
