"""The gateway's end of the nodes' tunnels (`swarm-gateway --tunnel-port`).

A node behind NAT (the portal found it unreachable at join, or it asked with
`swarm-worker --tunnel`) connects here with one WebSocket, authenticated by its node id
and its tunnel key; the routing table carries only the key's sha256 per node
(`RouteTable.tunnels`). The routing table gives that node's replicas the host
`node-<id>.tunnel.invalid`, which the upstream pool reaches in process (`UpstreamPool.local_hosts`):
each connection the pool opens there is an in-memory pipe (serving/gateway/pipe.py) into a
new stream of the tunnel (swarm_protocol/tunnel.py), which the agent pipes to the replica
on its own loopback. So the pool, the balancer, the retries, the replica key and the
node's TLS work as they do for direct replicas.

A node without a connected tunnel has no replicas in this gateway's table: the registry
re-applies the table the moment a tunnel connects or drops, without waiting for the
portal, and the pool's connections on a dropped tunnel are reset, so requests in flight
on it fail as a connection error and the forwarder retries them on another replica.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import ssl
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from serving.gateway.pipe import connect_pipe
from serving.gateway.routes import DeploymentRoute, RouteTable
from serving.gateway.upstream import UpstreamPool
from swarm_protocol.addresses import IN_PROCESS_SUFFIX, is_loopback_host
from swarm_protocol.tunnel import (
    CLOSE_TIMEOUT_S,
    MAX_MESSAGE_BYTES,
    NODE_HEADER,
    PING_INTERVAL_S,
    PING_TIMEOUT_S,
    TUNNEL_PATH,
    Mux,
    TunnelProtocolError,
    set_nodelay,
)

log = logging.getLogger("serving.gateway.tunnel")
MAX_NODE_ID_DIGITS = 19
MAX_KEY_CHARS = 128


def key_digest(tunnel_key: str) -> str:
    """Return the sha256 hex digest the table carries for a node's tunnel key."""
    return hashlib.sha256(tunnel_key.encode()).hexdigest()


def parse_node_id(text: str | None) -> int | None:
    """Return the node id of the X-Swarm-Node header (ASCII digits only), else None."""
    if not text or len(text) > MAX_NODE_ID_DIGITS or not text.isascii() \
            or not text.isdigit():
        return None
    return int(text)


def tunnel_host(node_id: int) -> str:
    """Return the host name the routing table gives a tunnel node's replicas in this
    gateway: the upstream pool reaches it in process (`UpstreamPool.local_hosts`)."""
    return f"node-{node_id}.tunnel{IN_PROCESS_SUFFIX}"


class TunnelRegistry:
    """The tunnels connected to this gateway, and the in-process hosts of their nodes.

    `reroute(table)` is the Fleet's hook: it returns the table the balancers should see.
    `on_change` is called (on the loop) when a tunnel connects or drops.
    """

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._digests: dict[int, str] = {}
        self._muxes: dict[int, Mux] = {}
        self._connections: dict[int, ServerConnection] = {}
        self.on_change: Callable[[], None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def connected(self) -> set[int]:
        """Return the ids of the nodes whose tunnel is up."""
        return set(self._muxes)

    # the table

    def reroute(self, table: RouteTable) -> RouteTable:
        """Return `table` with tunnel replicas on their node's in-process host, and those
        of nodes without a tunnel left out; learn the nodes' key digests from it."""
        self._digests = dict(table.tunnels)
        for node_id in [n for n, c in self._connections.items()
                        if n not in self._digests]:
            self._drop(node_id, notify=False)  # removed from the pool: its tunnel goes too
        deployments = {name: self._reroute_deployment(route)
                       for name, route in table.deployments.items()}
        return dataclasses.replace(table, deployments=deployments)

    def _reroute_deployment(self, route: DeploymentRoute) -> DeploymentRoute:
        if not any(r.tunnel for r in route.replicas):
            return route
        replicas = tuple(
            dataclasses.replace(r, host=tunnel_host(r.node_id)) if r.tunnel else r
            for r in route.replicas if not r.tunnel or r.node_id in self._muxes)
        return dataclasses.replace(route, replicas=replicas)

    def dial(self, node_id: int, port: int,
             protocol: asyncio.BaseProtocol) -> asyncio.Transport:
        """Join `protocol` to a new stream on the node's tunnel, to `port` on the node's
        loopback (the pool's LocalDial); ConnectionError when the node has no tunnel."""
        mux = self._muxes.get(node_id)
        if mux is None:
            raise ConnectionError(f"node {node_id} has no tunnel to this gateway")
        stream = mux.new_stream(port)  # ConnectionError: closed, or too many streams
        _, transport = connect_pipe(asyncio.get_running_loop(), stream, protocol,
                                    right_extra={"peername": (tunnel_host(node_id), port)})
        return transport

    # the WebSocket server

    def check(self, connection: ServerConnection, request: Request) -> Response | None:
        """websockets' process_request: refuse a wrong path, node or key before the
        handshake (401/404, nothing kept)."""
        if request.path != TUNNEL_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, "no tunnel here\n")
        node_id = parse_node_id(request.headers.get(NODE_HEADER))
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        expected = self._digests.get(node_id) if node_id is not None else None
        if expected is None or scheme != "Bearer" or not key or len(key) > MAX_KEY_CHARS \
                or not hmac.compare_digest(key_digest(key), expected):
            return connection.respond(HTTPStatus.UNAUTHORIZED,
                                      "unknown node or wrong tunnel key\n")
        return None

    async def serve_tunnel(self, connection: ServerConnection) -> None:
        """Serve one node's tunnel until it closes (a newer one from the node replaces it)."""
        node_id = parse_node_id(connection.request.headers.get(NODE_HEADER)) \
            if connection.request is not None else None
        if node_id is None:
            return
        self._drop(node_id, notify=False)  # a reconnect: the new tunnel replaces the old
        set_nodelay(connection.transport)
        mux = Mux(connection)
        self._muxes[node_id] = mux
        self._connections[node_id] = connection
        self._pool.local_hosts[tunnel_host(node_id)] = \
            lambda port, protocol: self.dial(node_id, port, protocol)
        log.info("tunnel of node %d connected from %s", node_id, connection.remote_address)
        self._changed()
        try:
            await mux.run()
        except ConnectionClosed:
            pass
        except TunnelProtocolError as exc:
            log.warning("tunnel of node %d broke the protocol: %s", node_id, exc)
        finally:
            if self._muxes.get(node_id) is mux:
                del self._muxes[node_id]
                del self._connections[node_id]
                self._pool.local_hosts.pop(tunnel_host(node_id), None)
                log.info("tunnel of node %d closed", node_id)
                self._changed()

    def _drop(self, node_id: int, notify: bool = True) -> None:
        connection = self._connections.pop(node_id, None)
        mux = self._muxes.pop(node_id, None)
        self._pool.local_hosts.pop(tunnel_host(node_id), None)
        if connection is not None:
            task = asyncio.get_running_loop().create_task(connection.close())
            self._closing.add(task)  # kept until done: the loop holds tasks only weakly
            task.add_done_callback(self._closing.discard)
        if mux is not None:
            for stream in list(mux.streams.values()):
                stream.abort()
            if notify:
                self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def close(self) -> None:
        """Close every tunnel."""
        for node_id in list(self._connections):
            self._drop(node_id)


class TunnelServer:
    """The WebSocket endpoint nodes connect to, tied to a gateway's fleet.

    `advertise(url)` is called once it listens with the URL nodes should use: the one
    given (--tunnel-url, e.g. wss:// through a TLS proxy), else ws://host:port/tunnel.
    """

    def __init__(self, fleet: Any, pool: UpstreamPool, host: str, port: int,
                 url: str | None = None, advertise: Callable[[str], None] | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.registry = TunnelRegistry(pool)
        self._ssl = ssl_context
        self._fleet = fleet
        self._host = host
        self._port = port
        self._url = url
        self._advertise = advertise
        self._server: Server | None = None
        fleet.reroute = self.registry.reroute
        self.registry.on_change = lambda: fleet.apply(fleet.table)

    @property
    def port(self) -> int:
        """Return the port it listens on (after start)."""
        assert self._server is not None
        port: int = next(iter(self._server.sockets)).getsockname()[1]
        return port

    async def start(self) -> None:
        """Listen for tunnels."""
        self._server = await serve(
            self.registry.serve_tunnel, self._host, self._port,
            process_request=self.registry.check, ping_interval=PING_INTERVAL_S,
            ping_timeout=PING_TIMEOUT_S, close_timeout=CLOSE_TIMEOUT_S,
            max_size=MAX_MESSAGE_BYTES + 64 * 1024,
            compression=None, server_header=None, ssl=self._ssl)
        scheme = "wss" if self._ssl is not None else "ws"
        if self._advertise is not None:
            self._advertise(self._url or f"{scheme}://{self._host}:{self.port}{TUNNEL_PATH}")

    async def aclose(self) -> None:
        """Stop listening and close every tunnel."""
        self.registry.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()


def add_tunnel_arguments(parser: argparse.ArgumentParser) -> None:
    """Add swarm-gateway's --tunnel-port and --tunnel-url."""
    parser.add_argument("--tunnel-port", type=int, default=None,
                        help="accept tunnels from nodes behind NAT on this port (0: any free "
                             "port; default: no tunnels)")
    parser.add_argument("--tunnel-url", default=None,
                        help="the URL nodes reach that port by (default "
                             f"ws[s]://HOST:PORT{TUNNEL_PATH}; wss:// behind a TLS proxy)")
    parser.add_argument("--tunnel-tls-cert-file", type=Path, default=None,
                        help="serve the tunnel port over TLS with this certificate chain "
                             "(PEM; nodes check it against their system's CAs)")
    parser.add_argument("--tunnel-tls-key-file", type=Path, default=None,
                        help="the private key of --tunnel-tls-cert-file (PEM)")


def attach_tunnels(args: argparse.Namespace, fleet: Any, pool: UpstreamPool,
                   advertise: Callable[[str], None]) -> TunnelServer | None:
    """Return the tunnel server --tunnel-port asks for (None without it); `advertise`
    gets its URL once it listens (the portal client sends it with each poll). Raises
    ValueError or OSError (ssl.SSLError) for unusable TLS files; warns (but serves) for
    plain ws:// on a network address."""
    if args.tunnel_port is None:
        return None
    context = None
    if args.tunnel_tls_cert_file is not None or args.tunnel_tls_key_file is not None:
        if args.tunnel_tls_cert_file is None or args.tunnel_tls_key_file is None:
            raise ValueError("--tunnel-tls-cert-file and --tunnel-tls-key-file go together")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(args.tunnel_tls_cert_file, args.tunnel_tls_key_file)
    # A warning, not a refusal: production may terminate TLS in a proxy in front.
    if context is None and not (args.tunnel_url or "").lower().startswith("wss://") \
            and not is_loopback_host(args.host):
        log.warning("the tunnel port (%s:%d) serves plain ws://: each node's tunnel key "
                    "crosses the network in clear, and whoever reads it can pose as that "
                    "node's tunnel; use --tunnel-tls-cert-file/--tunnel-tls-key-file, or "
                    "a TLS proxy in front and --tunnel-url wss://...",
                    args.host, args.tunnel_port)
    return TunnelServer(fleet, pool, args.host, args.tunnel_port, args.tunnel_url, advertise,
                        context)
