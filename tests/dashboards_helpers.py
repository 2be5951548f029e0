"""Helpers for the dashboards' tests: sockets with a session, a publisher in another process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.sessions.backends.db import SessionStore

from dashboards.routing import websocket_urlpatterns
from tests.live import ROOT, test_database_url

websocket_app = AuthMiddlewareStack(URLRouter(websocket_urlpatterns))


def session_cookie(user: Any) -> bytes:
    """Return a Cookie header value for a logged-in session of `user` (sync)."""
    store = SessionStore()
    store[SESSION_KEY] = str(user.pk)
    store[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    store[HASH_SESSION_KEY] = user.get_session_auth_hash()
    store.save()
    return f"{settings.SESSION_COOKIE_NAME}={store.session_key}".encode()


def socket(path: str, cookie: bytes | None = None) -> WebsocketCommunicator:
    headers = [(b"cookie", cookie)] if cookie else []
    return WebsocketCommunicator(websocket_app, path, headers=headers)


def publish_from_another_process(message_code: str, **env: str) -> None:
    """Run `bus.publish(<message_code>)` in a fresh Django process on the test database."""
    script = textwrap.dedent(f"""
        import django
        django.setup()
        from dashboards import bus
        from dashboards.messages import *
        bus.publish({message_code})
    """)
    environment = {**__import__("os").environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
                   "DATABASE_URL": test_database_url(), **env}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


GIB = 1024**3


def gpu(index: int = 0, util: float = 10.0, used_gib: float = 2.0) -> Any:
    from swarm_protocol.agent_messages import DeviceInfo

    return DeviceInfo(index=index, kind="gpu", name="NVIDIA H100", uuid=f"GPU-{index}",
                      memory_total_bytes=80 * GIB, memory_used_bytes=int(used_gib * GIB),
                      utilization_pct=util, temperature_c=51.0, power_w=230.0)


def register_node(join_secret: str, name: str, cost_per_hour: float = 2.5) -> Any:
    """Register a node through the real service; return the Node with `.secret` set."""
    from serving import services
    from serving.models import Node
    from swarm_protocol.agent_messages import RegisterRequest

    reply = services.do_register_node(RegisterRequest(
        join_token=join_secret, name=name, address="127.0.0.1", cost_per_hour=cost_per_hour,
        devices=[gpu()], labels={"zone": "lab"}))
    node = Node.objects.get(pk=reply.node_id)
    node.secret = reply.node_secret
    return node
