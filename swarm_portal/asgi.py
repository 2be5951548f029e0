"""ASGI entry point: HTTP to Django (behind an upload-size guard), WebSockets to Channels."""

from __future__ import annotations

import os
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "swarm_portal.settings")
# Django must be set up before anything imports models (consumers, routing).
django_http = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from dashboards import bus  # noqa: E402
from serving.gateway.app import GatewayApp  # noqa: E402
from serving.gateway_source import (  # noqa: E402
    DatabaseTableSource,
    PortalSessionAuth,
    celery_activator,
)
from swarm_portal.body_limit import BodySizeLimit  # noqa: E402
from swarm_portal.routing import websocket_urlpatterns  # noqa: E402

# This process serves the dashboards' sockets: with the in-memory channel layer, live
# messages raised here go straight to them, not through the outbox (dashboards/bus.py).
bus.mark_consumer_host()

# The inference hot path: a plain ASGI app beside Django (DESIGN.md measured Django's view
# stack at a tenth of direct throughput), with its routing table in memory.
gateway = GatewayApp(
    DatabaseTableSource(), PortalSessionAuth(), max_body_bytes=settings.GATEWAY_MAX_BODY_BYTES,
    metrics_enabled=True, metrics_token=settings.METRICS_TOKEN or None,
    activator=celery_activator)
portal = BodySizeLimit(django_http, limit_bytes=settings.MAX_UPLOAD_BYTES + 1024**2)


async def http_router(scope: dict, receive: Any, send: Any) -> None:
    """Send /v2 and /metrics to the gateway, everything else to Django (one path check)."""
    path = scope["path"]
    if (path.startswith("/v2") and (len(path) == 3 or path[3] == "/")) or path == "/metrics":
        await gateway(scope, receive, send)
    else:
        await portal(scope, receive, send)


application = ProtocolTypeRouter(
    {
        "http": http_router,
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
    }
)
