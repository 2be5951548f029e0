"""ASGI entry point: HTTP to Django (behind an upload-size guard), WebSockets to Channels."""

from __future__ import annotations

import json
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
from swarm_portal.body_limit import BodySizeLimit  # noqa: E402
from swarm_portal.routing import websocket_urlpatterns  # noqa: E402

# This process serves the dashboards' sockets: with the in-memory channel layer, live
# messages raised here go straight to them, not through the outbox (dashboards/bus.py).
bus.mark_consumer_host()

portal = BodySizeLimit(django_http, limit_bytes=settings.MAX_UPLOAD_BYTES + 1024**2)
# Inference is served by `swarm-gateway` (serving/gateway/service.py), a process of its own
# in front of the portal (make run starts it on the public port); not by this process.
NOT_HERE = json.dumps({"error": "inference (/v2) and its /metrics are served by "
                                "swarm-gateway, not by the portal process"}).encode()


async def http_router(scope: dict, receive: Any, send: Any) -> None:
    """Answer /v2 and /metrics with a JSON 404 (one path check); the rest goes to Django."""
    path = scope["path"]
    if (path.startswith("/v2") and (len(path) == 3 or path[3] == "/")) or path == "/metrics":
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(NOT_HERE)).encode())]})
        await send({"type": "http.response.body", "body": NOT_HERE})
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
