"""What a binary-extension request that failed to parse got wrong (the error path only).

A body of a JSON header followed by raw tensor bytes, sent without (or with a wrong)
Inference-Header-Content-Length, fails as JSON with a message about the bytes, not the
header. These helpers find where the JSON object really ends and say what to send.
"""

from __future__ import annotations

import json
from typing import Any


def binary_hint(body: bytes, json_length: int | None) -> str | None:
    """Return what a binary-extension body that failed to parse is missing, if anything.

    Only on the error path: finds where a JSON object at the start of the body ends and
    says which input declares binary data and what the header should have said.
    """
    text = body.decode("utf-8", "surrogateescape")
    try:
        header, end = json.JSONDecoder().raw_decode(text)
    except (ValueError, RecursionError):
        return None
    sizes = binary_sizes(header)
    if not sizes:
        return None
    actual = len(text[:end].encode("utf-8", "surrogateescape"))
    name, size_bytes = sizes[0]
    if json_length is None:
        return (f"input {name!r} declares {size_bytes} bytes of binary data "
                "(binary_data_size), so the request needs an Inference-Header-Content-Length "
                f"header: here the JSON part is {actual} bytes long")
    return (f"Inference-Header-Content-Length is {json_length} but the JSON part of the body "
            f"is {actual} bytes long (input {name!r} declares binary data)")


def binary_sizes(header: Any) -> list[tuple[str, Any]]:
    inputs = header.get("inputs") if isinstance(header, dict) else None
    found = []
    for item in inputs if isinstance(inputs, list) else ():
        parameters = item.get("parameters") if isinstance(item, dict) else None
        if isinstance(parameters, dict) and "binary_data_size" in parameters:
            found.append((str(item.get("name")), parameters["binary_data_size"]))
    return found
