"""Can the pool reach a joining node, and if not, the tunnel it serves through.

At join (Petals' reachability check) the agent listens on a port of its replica range
while it registers and answers each connection with a nonce it sent in the request; the
portal connects to the node's advertised address and that port, reads at most
MAX_NONCE_BYTES for PROBE_TIMEOUT_S, and compares. The nonce came back: `direct` (gateways
connect to the replicas). Anything else, or `tunnel` asked for (`swarm-worker --tunnel`):
`tunnel` (the agent keeps a WebSocket open to every gateway, serving/agent/tunnel.py).

Not an open SSRF: the probe runs only for a join that showed a usable join token, goes only
to the address the node advertises for itself and one unprivileged port (>= 1024), sends
nothing, reads a few bytes, and tells the caller one bit: whether its own random nonce
came back. A closed port, a filtered one and a service that answers with anything else all
read `tunnel`.

The tunnel key of a node is derived (HMAC under SECRET_KEY, like the replica key): stored
nowhere, recomputed at will; gateways get only its sha256 in the routing table. Gateways
report their tunnel URL when they poll the table (`?tunnel=`); heartbeat replies to tunnel
nodes list the URLs of gateways that polled lately.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import socket
from dataclasses import replace
from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db.models import Q

from serving import live, secrets
from serving.models import JoinToken, Node
from swarm_protocol.agent_messages import HeartbeatResponse, RegisterRequest, RegisterResponse

log = logging.getLogger(__name__)
DIRECT, TUNNEL = "direct", "tunnel"
PROBE_TIMEOUT_S = 2.0
MAX_NONCE_BYTES = 64
MIN_PROBE_PORT = 1024
TUNNEL_URL_TTL_S = 10.0  # a gateway that stopped polling drops off the list this soon
TUNNEL_URL_WRITE_EVERY_S = 1.0
MAX_TUNNEL_URL_CHARS = 200
MAX_TUNNEL_URLS = 64  # what HeartbeatResponse.tunnel_urls takes
_TUNNEL_URL = re.compile(r"wss?://[A-Za-z0-9.\-\[\]:]{1,190}/[A-Za-z0-9_./-]{0,64}", re.ASCII)
_written_s: dict[str, tuple[str, float]] = {}  # this process's last write per instance


class Unusable(Exception):
    """The join token cannot be used: no probe."""


def tunnel_key(node_id: int) -> str:
    """Return the key a node's agent shows the gateways to open its tunnel."""
    message = f"swarm-tunnel-key:{node_id}".encode()
    return hmac.new(settings.SECRET_KEY.encode(), message, hashlib.sha256).hexdigest()


def tunnel_digests(node_ids: list[int]) -> dict[int, str]:
    """Return {node id: sha256 hex of its tunnel key}: what the routing table carries."""
    return {node_id: hashlib.sha256(tunnel_key(node_id).encode()).hexdigest()
            for node_id in node_ids}


def tunnel_node_ids() -> list[int]:
    """Return the nodes that serve through a tunnel (one query)."""
    return list(Node.objects.filter(reach_mode=TUNNEL).values_list("pk", flat=True))


def _join_token_usable(secret: str, now: datetime) -> bool:
    usable = (Q(token_hash=secrets.digest(secret), revoked_at__isnull=True)
              & (Q(expires_at__isnull=True) | Q(expires_at__gt=now))
              & (Q(uses_left__isnull=True) | Q(uses_left__gt=0)))
    return JoinToken.objects.filter(usable).exists()


def probe(address: str, port: int, nonce: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Return whether `nonce` comes back from address:port within `timeout_s` (never
    raises; sends nothing)."""
    try:
        with socket.create_connection((address, port), timeout=timeout_s) as sock:
            received = b""
            while len(received) < MAX_NONCE_BYTES and b"\n" not in received:
                chunk = sock.recv(MAX_NONCE_BYTES - len(received))
                if not chunk:
                    break
                received += chunk
    except (OSError, ValueError, UnicodeError):
        return False
    answer = received.split(b"\n", 1)[0]
    return bool(nonce) and hmac.compare_digest(answer, nonce.encode())


def reach_mode(message: RegisterRequest, now: datetime) -> str:
    """Return how gateways reach a joining node: DIRECT or TUNNEL (Unusable: the token
    would be refused, so nothing is probed)."""
    if not _join_token_usable(message.join_token, now):
        raise Unusable("the join token is unknown, expired, revoked or used up")
    if message.tunnel:
        return TUNNEL
    port = message.probe_port
    if port is None or not MIN_PROBE_PORT <= port <= 65535 or not message.probe_nonce:
        return DIRECT  # an older agent: no probe, as before
    reached = probe(message.address, port, message.probe_nonce)
    log.info("reachability of %s:%d at join: %s", message.address, port,
             "reached" if reached else "not reached (tunnel)")
    return DIRECT if reached else TUNNEL


def joined(response: RegisterResponse, mode: str) -> RegisterResponse:
    """Return a new node's join reply saying its mode (stored at its creation); a tunnel
    node's key digest reaches the gateways' tables at once."""
    if mode == TUNNEL:
        live.bump_routes()
    return replace(response, reach_mode=mode)


def with_tunnel(node: Node, response: HeartbeatResponse) -> HeartbeatResponse:
    """Return the heartbeat reply with the tunnel's key and the gateways' URLs, for a
    tunnel node (unchanged for a direct one)."""
    if node.reach_mode != TUNNEL:
        return response
    return replace(response, reach_mode=TUNNEL, tunnel_key=tunnel_key(node.pk),
                   tunnel_urls=tunnel_urls())


# gateways' tunnel URLs, in the cache


def _url_key(instance: str) -> str:
    return f"gateway:{instance}:tunnel"


def valid_tunnel_url(url: str) -> bool:
    """Return whether `url` is a ws:// or wss:// URL we hand to agents."""
    return len(url) <= MAX_TUNNEL_URL_CHARS and bool(_TUNNEL_URL.fullmatch(url))


def note_tunnel_url(instance: str, url: str | None, now_s: float) -> None:
    """Record the tunnel URL a gateway instance reported with its poll (at most one cache
    write a second per instance and process)."""
    if url is None:
        return
    last = _written_s.get(instance)
    if last is not None and last[0] == url and 0 <= now_s - last[1] < TUNNEL_URL_WRITE_EVERY_S:
        return
    try:
        cache.set(_url_key(instance), url, TUNNEL_URL_TTL_S)
    except Exception as exc:  # a cache outage: the table is still served
        raise live.CacheUnavailable(str(exc)) from exc
    if len(_written_s) >= live.MAX_GATEWAY_INSTANCES:
        _written_s.clear()
    _written_s[instance] = (url, now_s)


def tunnel_urls() -> list[str]:
    """Return the tunnel URLs of the gateways that polled lately (sorted, distinct)."""
    try:
        known: dict[str, Any] = cache.get(live.GATEWAYS_KEY) or {}
        urls = cache.get_many([_url_key(instance) for instance in known])
    except Exception:  # no list this time: the agent keeps the tunnels it has
        log.warning("could not read the gateways' tunnel URLs", exc_info=True)
        return []
    return sorted({str(url) for url in urls.values()})[:MAX_TUNNEL_URLS]
