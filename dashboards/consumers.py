"""WebSocket consumers: one per kind of page, authenticated by the session, one group each.

They only authenticate and forward: every message is rebuilt with message_from_dict (so a
malformed payload never reaches a browser) and sent as its to_dict().
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from dashboards import bus, relay
from dashboards.messages import DEPLOYMENTS, FLEET, OVERVIEW, MessageError, message_from_dict
from registry.permissions import can_view

log = logging.getLogger(__name__)
CLOSE_FORBIDDEN = 4403


class DashboardConsumer(AsyncJsonWebsocketConsumer):
    """Accept viewers and above; join the page's group; forward its live messages."""

    group = ""

    async def connect(self) -> None:
        user = self.scope.get("user")
        if not await database_sync_to_async(can_view)(user):
            await self.close(code=CLOSE_FORBIDDEN)
            return
        bus.attach_loop(asyncio.get_running_loop())
        relay.start_relay()
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.group and self.channel_layer is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if isinstance(content, dict) and content.get("type") == "ping":
            await self.send_json({"type": "pong"})

    async def dashboard_message(self, event: dict[str, Any]) -> None:
        try:
            message = message_from_dict(event.get("payload"))
        except MessageError as exc:
            log.warning("dropped a malformed live message: %s", exc)
            return
        await self.send_json(message.to_dict())


class OverviewConsumer(DashboardConsumer):
    group = OVERVIEW


class FleetConsumer(DashboardConsumer):
    group = FLEET


class DeploymentsConsumer(DashboardConsumer):
    group = DEPLOYMENTS
