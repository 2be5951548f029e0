"""Size limits on what an unauthenticated client sends, checked before anything is kept.

Nothing a client sends before it is authenticated may grow the gateway's state: every
cache, metric label and log line below is keyed by something these limits have bounded
first. uvicorn (with httptools) accepts request heads of any size, so the app refuses
over-long ones itself; the head has already been read by then, but nothing keeps it.
"""

from __future__ import annotations

from collections.abc import Sequence

from serving.gateway.responses import Response, error

# Browsers and proxies stay well under this (nginx's default buffers: 4 x 8 KiB).
MAX_HEADERS_TOTAL_BYTES = 32 * 1024  # names and values, all headers together
MAX_TARGET_BYTES = 2 * 1024  # path and query string
# Our API keys (`swp_` + 64 hex) and Django session keys (32 characters) are far shorter:
# anything longer cannot match, so it is refused before any cache sees it.
MAX_CREDENTIAL_BYTES = 256
SHOWN_CHARS = 64  # of a client-sent string quoted in a log line


def headers_fit(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Return whether the request headers are within MAX_HEADERS_TOTAL_BYTES."""
    total_bytes = 0
    for name, value in headers:
        total_bytes += len(name) + len(value)
    return total_bytes <= MAX_HEADERS_TOTAL_BYTES


def header_refusal(headers: Sequence[tuple[bytes, bytes]]) -> Response:
    """Return the 431 answer for headers that do not fit, naming the largest one."""
    name, value = max(headers, key=lambda header: len(header[0]) + len(header[1]))
    largest = name[:SHOWN_CHARS].decode("latin-1")
    return error(431, f"the request headers are longer than {MAX_HEADERS_TOTAL_BYTES} bytes "
                      f"in all (the largest: {largest!r}, {len(name) + len(value)} bytes)")


def target_refusal(path: str, query: bytes) -> Response | None:
    """Return the 414 answer for an over-long path and query, or None when they fit."""
    if len(path) + len(query) <= MAX_TARGET_BYTES:
        return None
    return error(414, f"the request path and query are longer than {MAX_TARGET_BYTES} bytes")


def credential_fits(value: bytes | str) -> bool:
    """Return whether a credential (API key header, session key) may be looked up at all."""
    return len(value) <= MAX_CREDENTIAL_BYTES


def shown(text: str) -> str:
    """Return a client-sent string cut short enough for a log line."""
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}...({len(text)} chars)"
