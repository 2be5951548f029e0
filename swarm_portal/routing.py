"""WebSocket routes; the dashboards' consumers register here."""

from __future__ import annotations

from typing import Any

from dashboards.routing import websocket_urlpatterns as dashboard_routes

websocket_urlpatterns: list[Any] = [*dashboard_routes]
