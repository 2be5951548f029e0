"""WebSocket routes; the dashboards' consumers register here."""

from __future__ import annotations

from typing import Any

websocket_urlpatterns: list[Any] = []
