"""WebSocket routes of the dashboards: /ws/<page>/."""

from __future__ import annotations

from django.urls import path

from dashboards import consumers

websocket_urlpatterns = [
    path("ws/overview/", consumers.OverviewConsumer.as_asgi()),
    path("ws/fleet/", consumers.FleetConsumer.as_asgi()),
    path("ws/deployments/", consumers.DeploymentsConsumer.as_asgi()),
]
