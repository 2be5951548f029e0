"""The gateway's end of the nodes' tunnels (`swarm-gateway --tunnel-port`).

A node behind NAT (the portal found it unreachable at join, or it asked with
`swarm-worker --tunnel`) connects here with one WebSocket, authenticated by its node id
and its tunnel key; the routing table carries only the key's sha256 per node
(`RouteTable.tunnels`). For each of that node's replicas the gateway listens on a port of
its own loopback, and its routing table points at that port: each TCP connection the
upstream pool opens there becomes a stream of the tunnel (swarm_protocol/tunnel.py), which
the agent pipes to the replica on its own loopback. So the pool, the balancer, the
retries and the replica key work as they do for direct replicas, with no change to them.

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
import socket
import ssl
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from serving.gateway.routes import DeploymentRoute, ReplicaRoute, RouteTable
from swarm_protocol.tunnel import (
    MAX_MESSAGE_BYTES,
    NODE_HEADER,
    PING_INTERVAL_S,
    PING_TIMEOUT_S,
    TUNNEL_PATH,
    Mux,
    Stream,
    TunnelProtocolError,
    set_nodelay,
)

log = logging.getLogger("serving.gateway.tunnel")
LOOPBACK = "127.0.0.1"
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


class _Refused(asyncio.Protocol):
    """Accepted on a tunnel port while the node has no tunnel: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _Listener:
    """A loopback port standing for one replica of a tunnel node."""

    def __init__(self, registry: TunnelRegistry, node_id: int, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(1024)  # connections wait here until the server below accepts
        self.port: int = self.sock.getsockname()[1]
        self._server: asyncio.Server | None = None
        self._closed = False
        factory = lambda: registry.accept(node_id, port)  # noqa: E731
        self._task = asyncio.get_running_loop().create_task(self._serve(factory))

    async def _serve(self, factory: Callable[[], asyncio.Protocol]) -> None:
        server = await asyncio.get_running_loop().create_server(factory, sock=self.sock)
        if self._closed:
            server.close()
        self._server = server

    def close(self) -> None:
        self._closed = True
        if self._server is not None:
            self._server.close()
        elif self._task.done():
            self.sock.close()
        # else: _serve closes the server it is about to make


class TunnelRegistry:
    """The tunnels connected to this gateway, and the loopback ports of their replicas.

    `reroute(table)` is the Fleet's hook: it returns the table the balancers should see.
    `on_change` is called (on the loop) when a tunnel connects or drops.
    """

    def __init__(self) -> None:
        self._digests: dict[int, str] = {}
        self._muxes: dict[int, Mux] = {}
        self._connections: dict[int, ServerConnection] = {}
        self._listeners: dict[tuple[int, int], _Listener] = {}
        self.on_change: Callable[[], None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def connected(self) -> set[int]:
        """Return the ids of the nodes whose tunnel is up."""
        return set(self._muxes)

    # the table

    def reroute(self, table: RouteTable) -> RouteTable:
        """Return `table` with tunnel replicas pointed at loopback ports, and those of nodes
        without a tunnel left out; learn the nodes' key digests from it."""
        self._digests = dict(table.tunnels)
        for node_id in [n for n, c in self._connections.items()
                        if n not in self._digests]:
            self._drop(node_id, notify=False)  # removed from the pool: its tunnel goes too
        used: set[tuple[int, int]] = set()
        deployments = {}
        for name, route in table.deployments.items():
            deployments[name] = self._reroute_deployment(route, used)
        for key in [k for k in self._listeners if k not in used]:
            self._listeners.pop(key).close()
        return dataclasses.replace(table, deployments=deployments)

    def _reroute_deployment(self, route: DeploymentRoute,
                            used: set[tuple[int, int]]) -> DeploymentRoute:
        if not any(r.tunnel for r in route.replicas):
            return route
        replicas: list[ReplicaRoute] = []
        for replica in route.replicas:
            if not replica.tunnel:
                replicas.append(replica)
            elif replica.node_id in self._muxes:
                key = (replica.node_id, replica.port)
                used.add(key)
                listener = self._listeners.get(key)
                if listener is None:
                    listener = self._listeners[key] = _Listener(self, *key)
                replicas.append(dataclasses.replace(replica, host=LOOPBACK,
                                                    port=listener.port))
        return dataclasses.replace(route, replicas=tuple(replicas))

    def accept(self, node_id: int, port: int) -> asyncio.Protocol:
        """Return the protocol of a connection to a replica's loopback port: a new stream
        on the node's tunnel, or one closed at once when it has none."""
        mux = self._muxes.get(node_id)
        if mux is None:
            return _Refused()
        try:
            stream: Stream = mux.new_stream(port)
        except ConnectionError:
            return _Refused()
        return stream

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
                log.info("tunnel of node %d closed", node_id)
                self._changed()

    def _drop(self, node_id: int, notify: bool = True) -> None:
        connection = self._connections.pop(node_id, None)
        mux = self._muxes.pop(node_id, None)
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
        """Close every listener and tunnel."""
        for listener in self._listeners.values():
            listener.close()
        self._listeners.clear()
        for node_id in list(self._connections):
            self._drop(node_id)


class TunnelServer:
    """The WebSocket endpoint nodes connect to, tied to a gateway's fleet.

    `advertise(url)` is called once it listens with the URL nodes should use: the one
    given (--tunnel-url, e.g. wss:// through a TLS proxy), else ws://host:port/tunnel.
    """

    def __init__(self, fleet: Any, host: str, port: int, url: str | None = None,
                 advertise: Callable[[str], None] | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.registry = TunnelRegistry()
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
            ping_timeout=PING_TIMEOUT_S, max_size=MAX_MESSAGE_BYTES + 64 * 1024,
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


def attach_tunnels(args: argparse.Namespace, fleet: Any,
                   advertise: Callable[[str], None]) -> TunnelServer | None:
    """Return the tunnel server --tunnel-port asks for (None without it); `advertise`
    gets its URL once it listens (the portal client sends it with each poll). Raises
    ValueError or OSError (ssl.SSLError) for unusable TLS files."""
    if args.tunnel_port is None:
        return None
    context = None
    if args.tunnel_tls_cert_file is not None or args.tunnel_tls_key_file is not None:
        if args.tunnel_tls_cert_file is None or args.tunnel_tls_key_file is None:
            raise ValueError("--tunnel-tls-cert-file and --tunnel-tls-key-file go together")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(args.tunnel_tls_cert_file, args.tunnel_tls_key_file)
    return TunnelServer(fleet, args.host, args.tunnel_port, args.tunnel_url, advertise,
                        context)
