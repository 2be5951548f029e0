"""OIP datatypes as numpy arrays (no torch): dtypes, JSON coercion and BF16 bit tricks.

numpy has no bfloat16, so a BF16 tensor travels as its raw bits in a uint16 array; the
runner reinterprets those bits as torch.bfloat16 without a copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# OIP datatype -> little-endian numpy dtype (BF16: raw bits).
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("u1"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_FLOAT_TYPES = frozenset({"FP16", "BF16", "FP32", "FP64"})
_BF16_QUIET_NAN = 0x7FC0


class DataError(ValueError):
    """Tensor data that cannot be read as the declared datatype and shape."""


def element_count(shape: tuple[int, ...]) -> int:
    """Return the number of elements of a concrete shape."""
    count = 1
    for dim in shape:
        count *= dim
    return count


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Return bfloat16 bits (uint16) of float values, rounded to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    result = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        result[nan] = _BF16_QUIET_NAN
    return result


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Return float32 values of bfloat16 bits (uint16)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def array_from_json(data: Any, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Return JSON `data` (nested or flat) as an array of `datatype` shaped `shape`."""
    if not isinstance(data, list):
        raise DataError("data must be a JSON array")
    try:
        raw = np.asarray(data)
    except ValueError:
        raise DataError("data is a ragged nested array") from None
    if raw.size != element_count(shape):
        raise DataError(f"data has {raw.size} elements but shape {list(shape)} needs "
                        f"{element_count(shape)}")
    return _coerce(raw, datatype).reshape(shape)


def _coerce(raw: np.ndarray, datatype: str) -> np.ndarray:
    kind = raw.dtype.kind
    if raw.size == 0:
        return np.zeros(0, dtype=NUMPY_DTYPES[datatype])
    if kind not in "bif":
        raise DataError(f"data holds values that are not {datatype} numbers")
    if datatype in _FLOAT_TYPES:
        if datatype == "BF16":
            return float32_to_bf16_bits(raw.astype(np.float32))
        return raw.astype(NUMPY_DTYPES[datatype])
    if datatype == "BOOL":
        return _coerce_bool(raw)
    return _coerce_integer(raw, datatype)


def _coerce_bool(raw: np.ndarray) -> np.ndarray:
    if raw.dtype.kind != "b" and not np.isin(raw, (0, 1)).all():
        raise DataError("BOOL data must be true/false (or 0/1)")
    return raw.astype(np.bool_)


def _coerce_integer(raw: np.ndarray, datatype: str) -> np.ndarray:
    if raw.dtype.kind == "f" and not (np.isfinite(raw).all() and (raw == np.floor(raw)).all()):
        raise DataError(f"{datatype} data must be integers")
    info = np.iinfo(NUMPY_DTYPES[datatype])
    if raw.min() < info.min or raw.max() > info.max:
        raise DataError(f"{datatype} data must lie in [{info.min}, {info.max}]")
    return raw.astype(NUMPY_DTYPES[datatype])


def array_from_bytes(buffer: bytes | memoryview, datatype: str,
                     shape: tuple[int, ...]) -> np.ndarray:
    """Return raw little-endian row-major bytes as an array of `datatype` shaped `shape`."""
    dtype = NUMPY_DTYPES[datatype]
    expected_bytes = element_count(shape) * dtype.itemsize
    if len(buffer) != expected_bytes:
        raise DataError(f"binary data has {len(buffer)} bytes but a {datatype} tensor shaped "
                        f"{list(shape)} needs {expected_bytes}")
    if datatype == "BOOL":
        flags: np.ndarray = np.frombuffer(buffer, dtype=np.uint8) != 0
        return flags.reshape(shape)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def array_to_json(array: np.ndarray, datatype: str) -> list[Any]:
    """Return a flat JSON list of the array's elements."""
    if datatype == "BF16":
        array = bf16_bits_to_float32(array)
    values: list[Any] = array.reshape(-1).tolist()
    return values


def array_to_bytes(array: np.ndarray, datatype: str) -> bytes:
    """Return the array as raw little-endian row-major bytes (BOOL: one byte each)."""
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype]).tobytes()
