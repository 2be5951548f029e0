"""Refuse an oversized request body from its Content-Length, before reading any of it.

Django's ASGI handler spools the whole body to disk before a view runs, so a view
alone could only refuse a 50 GB upload after storing it. A chunked body (no length)
is counted as Django reads it: past the limit the client gets the same 413, and Django
sees a disconnect, so no view runs and nothing is staged.
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
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = self._declared_length(scope)
        if declared is not None and declared > self.limit_bytes:
            await self._refuse(send)
            return
        if declared is None:
            await self._counted(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _counted(self, scope: Scope, receive: Any, send: Any) -> None:
        received_bytes = 0
        refused = False

        async def counting_receive() -> dict[str, Any]:
            nonlocal received_bytes, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received_bytes += len(message.get("body", b""))
                if received_bytes > self.limit_bytes:
                    refused = True
                    await self._refuse(send)
                    await self._drain(receive, message)
                    return {"type": "http.disconnect"}
                if received_bytes and not message.get("more_body"):
                    # Django reads a body without Content-Length as empty: say so plainly
                    # instead of letting a view complain about missing fields.
                    refused = True
                    await self._answer(send, 411, "send the body with a Content-Length "
                                       "header (chunked request bodies are not supported)")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)

    async def _drain(self, receive: Any, message: dict[str, Any]) -> None:
        # Read (and drop) a bounded rest of the body, so that the client, still sending,
        # reads our 413 instead of a connection reset; a longer body is cut off.
        drained_bytes = 0
        while message.get("more_body") and drained_bytes <= self.limit_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained_bytes += len(message.get("body", b""))

    @staticmethod
    def _declared_length(scope: Scope) -> int | None:
        """Return Content-Length, 0 when malformed, None when absent (a chunked body)."""
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return 0
        return None

    async def _refuse(self, send: Any) -> None:
        await self._answer(send, 413, f"the request body exceeds the limit of "
                                      f"{self.limit_bytes} bytes (MAX_UPLOAD_BYTES)")

    @staticmethod
    async def _answer(send: Any, status: int, error: str) -> None:
        body = json.dumps({"error": error}).encode()
        await send({
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close")],
        })
        await send({"type": "http.response.body", "body": body})
