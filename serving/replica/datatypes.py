"""OIP datatypes as numpy arrays (no torch): dtypes, JSON coercion and BF16 bit tricks.

numpy has no bfloat16, so a BF16 tensor travels as its raw bits in a uint16 array; the
runner reinterprets those bits as torch.bfloat16 without a copy. A BYTES tensor is an
object array of `bytes`; on the wire (binary extension) each element is a 4-byte
little-endian length followed by that many bytes, in JSON a string.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

# OIP datatype -> little-endian numpy dtype (BF16: raw bits).
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
# One BYTES element at most this long, and at most this many elements in one tensor: the
# body limit alone would let 4-byte elements turn a 256 MiB body into 64 M Python objects.
MAX_BYTES_ELEMENT_BYTES = 64 * 1024 * 1024
MAX_BYTES_ELEMENTS = 1 << 20
_LENGTH = struct.Struct("<I")
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
    result: np.ndarray = ((bits + rounding) >> 16).astype(np.uint16)
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
    if datatype == "BYTES":
        return bytes_from_json(data, shape)
    try:
        raw = np.asarray(data)
    except ValueError:
        raise DataError("data is a ragged nested array") from None
    if raw.size != element_count(shape):
        raise DataError(f"data has {raw.size} elements but shape {list(shape)} needs "
                        f"{element_count(shape)}")
    return _coerce(raw, datatype, data).reshape(shape)


def _coerce(raw: np.ndarray, datatype: str, data: list[Any]) -> np.ndarray:
    kind = raw.dtype.kind
    if raw.size == 0:
        return np.zeros(0, dtype=NUMPY_DTYPES[datatype])
    if kind not in "biuf":
        raise DataError(f"data holds values that are not {datatype} numbers")
    if datatype in _FLOAT_TYPES:
        if datatype == "BF16":
            return float32_to_bf16_bits(raw.astype(np.float32))
        return raw.astype(NUMPY_DTYPES[datatype])
    if datatype == "BOOL":
        return _coerce_bool(raw)
    return _coerce_integer(raw, datatype, data)


def _coerce_bool(raw: np.ndarray) -> np.ndarray:
    if raw.dtype.kind != "b" and not np.isin(raw, (0, 1)).all():
        raise DataError("BOOL data must be true/false (or 0/1)")
    return raw.astype(np.bool_)


def _coerce_integer(raw: np.ndarray, datatype: str, data: list[Any]) -> np.ndarray:
    if raw.dtype.kind == "f" and not (np.isfinite(raw).all() and (raw == np.floor(raw)).all()):
        raise DataError(f"{datatype} data must be integers")
    info = np.iinfo(NUMPY_DTYPES[datatype])
    if raw.min() < info.min or raw.max() > info.max:
        raise DataError(f"{datatype} data must lie in [{info.min}, {info.max}]")
    if raw.dtype.kind == "f" and datatype in ("INT64", "UINT64"):
        # numpy holds [0, 2**64 - 1] as float64 (no integer type has both): convert the
        # Python integers themselves, which stay exact.
        try:
            return np.array(data, dtype=NUMPY_DTYPES[datatype]).reshape(-1)
        except (OverflowError, ValueError, TypeError):
            raise DataError(f"{datatype} data must lie in [{info.min}, {info.max}]") from None
    return raw.astype(NUMPY_DTYPES[datatype])


def bytes_from_json(data: list[Any], shape: tuple[int, ...]) -> np.ndarray:
    """Return JSON strings (nested or flat) as a BYTES array (UTF-8) shaped `shape`."""
    flat = _flatten_strings(data)
    _check_bytes_count(len(flat), shape)
    array = np.empty(len(flat), dtype=object)
    for index, text in enumerate(flat):
        try:
            element = text.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"element {index} is not valid Unicode (a lone surrogate)") \
                from None
        if len(element) > MAX_BYTES_ELEMENT_BYTES:
            raise DataError(f"element {index} is {len(element)} bytes long, at most "
                            f"{MAX_BYTES_ELEMENT_BYTES} are accepted")
        array[index] = element
    return array.reshape(shape)


def _flatten_strings(data: list[Any]) -> list[str]:
    flat: list[str] = []
    stack = [iter(data)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            if len(stack) >= 64:
                raise DataError("data is nested too deeply")
            stack.append(iter(item))
        elif isinstance(item, str):
            flat.append(item)
            if len(flat) > MAX_BYTES_ELEMENTS:
                raise DataError(f"a BYTES tensor has at most {MAX_BYTES_ELEMENTS} elements")
        else:
            raise DataError("BYTES data must be strings (send raw bytes as binary data)")
    return flat


_END = object()


def _check_bytes_count(count: int, shape: tuple[int, ...]) -> None:
    expected = element_count(shape)
    if expected > MAX_BYTES_ELEMENTS:
        raise DataError(f"shape {list(shape)} has {expected} elements; a BYTES tensor has at "
                        f"most {MAX_BYTES_ELEMENTS}")
    if count != expected:
        raise DataError(f"data has {count} elements but shape {list(shape)} needs {expected}")


def bytes_from_buffer(buffer: bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
    """Return length-prefixed elements (4-byte little-endian length, then the bytes) as a
    BYTES array shaped `shape`; a length past the buffer's end is refused before any copy."""
    expected = element_count(shape)
    _check_bytes_count(expected, shape)
    view = memoryview(buffer)
    array = np.empty(expected, dtype=object)
    offset = 0
    for index in range(expected):
        if offset + _LENGTH.size > len(view):
            raise DataError(f"binary data ends after {index} of {expected} BYTES elements")
        (size,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if size > MAX_BYTES_ELEMENT_BYTES:
            raise DataError(f"element {index} declares {size} bytes, at most "
                            f"{MAX_BYTES_ELEMENT_BYTES} are accepted")
        if size > len(view) - offset:
            raise DataError(f"element {index} declares {size} bytes but only "
                            f"{len(view) - offset} remain in its binary data")
        array[index] = bytes(view[offset:offset + size])
        offset += size
    if offset != len(view):
        raise DataError(f"binary data has {len(view) - offset} bytes after the last of its "
                        f"{expected} BYTES elements")
    return array.reshape(shape)


def bytes_to_buffer(array: np.ndarray) -> bytes:
    """Return a BYTES array as length-prefixed elements (str elements encoded as UTF-8)."""
    parts: list[bytes] = []
    for element in array.reshape(-1):
        data = element.encode("utf-8") if isinstance(element, str) else bytes(element)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def array_from_bytes(buffer: bytes | memoryview, datatype: str,
                     shape: tuple[int, ...]) -> np.ndarray:
    """Return raw little-endian row-major bytes as an array of `datatype` shaped `shape`."""
    if datatype == "BYTES":
        return bytes_from_buffer(buffer, shape)
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
    """Return a flat JSON list of the array's elements (BYTES: strings; DataError when an
    element is not UTF-8, which only binary data can carry)."""
    if datatype == "BYTES":
        return [_text(element, index) for index, element in enumerate(array.reshape(-1))]
    if datatype == "BF16":
        array = bf16_bits_to_float32(array)
    values: list[Any] = array.reshape(-1).tolist()
    return values


def _text(element: Any, index: int) -> str:
    if isinstance(element, str):
        return element
    try:
        return bytes(element).decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"element {index} is not UTF-8 text, which JSON cannot carry: "
                        "request this output as binary data") from None


def array_to_bytes(array: np.ndarray, datatype: str) -> bytes:
    """Return the array as raw little-endian row-major bytes (BOOL: one byte each; BYTES:
    length-prefixed elements)."""
    if datatype == "BYTES":
        return bytes_to_buffer(array)
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype]).tobytes()
