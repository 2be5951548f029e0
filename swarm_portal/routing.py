"""WebSocket routes; the dashboards' consumers register here, and nothing else is served."""

from __future__ import annotations

from typing import Any

from django.urls import re_path

from dashboards.routing import websocket_urlpatterns as dashboard_routes

# Close code for "no such socket": 4000-4999 are the application's own (RFC 6455 7.4.2).
UNKNOWN_PATH_CLOSE_CODE = 4404


async def refuse_unknown_path(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Close an upgrade to a path with no consumer before accepting it (the server says 403).

    Without this, Channels' URLRouter raises ValueError: a 500 and a traceback per attempt.
    """
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close", "code": UNKNOWN_PATH_CLOSE_CODE})


websocket_urlpatterns: list[Any] = [*dashboard_routes, re_path(r"", refuse_unknown_path)]
