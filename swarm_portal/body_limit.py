"""Refuse an oversized request body from its Content-Length, before reading any of it.

Django's ASGI handler spools the whole body to disk before a view runs, so a view
alone could only refuse a 50 GB upload after storing it. Chunked bodies without a
length are counted by the upload handler instead.
"""

from __future__ import annotations

import json
from typing import Any

Scope = dict[str, Any]


class BodySizeLimit:
    """ASGI middleware: 413 with a JSON body when Content-Length exceeds the limit."""

    def __init__(self, app: Any, limit_bytes: int) -> None:
        self.app = app
        self.limit_bytes = limit_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self._declared_length(scope) > self.limit_bytes:
            await self._refuse(send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _declared_length(scope: Scope) -> int:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return 0
        return 0

    async def _refuse(self, send: Any) -> None:
        body = json.dumps(
            {"error": f"the request body exceeds the limit of {self.limit_bytes} bytes "
                      "(MAX_UPLOAD_BYTES)"}
        ).encode()
        await send({
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close")],
        })
        await send({"type": "http.response.body", "body": body})
