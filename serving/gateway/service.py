"""`swarm-gateway`: the inference gateway as a process of its own, in front of a portal.

    SWARM_GATEWAY_TOKEN=... swarm-gateway --portal https://portal.example --port 8080

Serves `/v2` (and `/metrics`) from a routing table it polls from the portal's gateway API
(`serving/gateway/portal_source.PortalClient`), with none of Django's machinery. Several
may run on one host (`--reuse-port`, or one inherited listening socket, `--fd`, as `make
run` does) and on many hosts. With `--pass-through` every other request (pages, the
management API, the dashboards' WebSockets) is forwarded to the portal, so one URL serves
both. Started while the portal is away, it serves the last table saved at `--table-cache`.
With `--metrics-dir` the processes that share a port share their figures through files
there, so `/metrics` on any of them reports them all (serving/gateway/metrics_share.py).
On SIGTERM it stops accepting first, then finishes the requests in flight. Prints
`GATEWAY READY port=N` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn
import uvloop

from serving.gateway.app import DEFAULT_MAX_BODY_BYTES, GatewayApp
from serving.gateway.fast_asgi import is_gateway_path
from serving.gateway.fast_http import protocol_class
from serving.gateway.metrics_share import SharedMetrics, SnapshotWriter
from serving.gateway.portal_proxy import PortalProxy
from serving.gateway.portal_source import PortalClient
from serving.gateway.responses import Receive, Scope, Send
from serving.gateway.tunnel import TunnelServer, add_tunnel_arguments, attach_tunnels

METRICS_TOKEN_ENV = "SWARM_GATEWAY_METRICS_TOKEN"  # noqa: S105  (a variable name)
TOKEN_ENV = "SWARM_GATEWAY_TOKEN"  # noqa: S105  (a variable name)
MAX_TOKEN_CHARS = 256
KEEP_ALIVE_S = 75
LISTEN_BACKLOG = 4096
# As swarm_portal/uvicorn_serve.py: after we stop accepting, a request already sent on a
# connection accepted a moment before still gets read and answered.
REQUEST_ARRIVAL_GRACE_S = 0.5
GRACEFUL_SHUTDOWN_S = 20  # requests in flight (a held cold start, a download) get this long
GRPC_STOP_GRACE_S = 5.0
log = logging.getLogger("serving.gateway.service")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Return the command line options (exits with a message when they are wrong)."""
    parser = argparse.ArgumentParser(prog="swarm-gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--portal", required=True, help="the portal's URL (its Host header)")
    parser.add_argument("--portal-uds", help="reach the portal over this unix socket")
    parser.add_argument("--token-file", type=Path,
                        help="file holding the gateway token (else $SWARM_GATEWAY_TOKEN)")
    parser.add_argument("--token", help=argparse.SUPPRESS)  # only to refuse it clearly
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0: any free port")
    parser.add_argument("--fd", type=int, help="serve on this inherited listening socket")
    parser.add_argument("--reuse-port", action="store_true",
                        help="SO_REUSEPORT: several gateway processes share the port")
    parser.add_argument("--grpc-port", type=int, default=0, help="OIP gRPC port (0: off)")
    add_tunnel_arguments(parser)  # --tunnel-port, --tunnel-url (serving/gateway/tunnel.py)
    parser.add_argument("--pass-through", action="store_true",
                        help="forward every request but /v2 and /metrics to the portal")
    parser.add_argument("--table-cache", type=Path,
                        help="keep the last routing table here (served while the portal "
                             "is away at start)")
    parser.add_argument("--instance-id", default=None,
                        help="this process's name to the portal (default host:pid)")
    parser.add_argument("--metrics-dir", type=Path,
                        help="share /metrics with the other processes given this directory "
                             "(each writes <instance-id>.json there; a scrape sums them)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--http", choices=("lean", "uvicorn"), default="lean",
                        help="the HTTP/1.1 server for /v2: the lean one (fast_http.py) or "
                             "uvicorn's (for comparison)")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    if args.token is not None:
        parser.error("never put the gateway token on the command line (ps shows it to "
                     "everyone): use $SWARM_GATEWAY_TOKEN or --token-file")
    if args.fd is not None and args.reuse_port:
        parser.error("--fd and --reuse-port exclude each other (the socket is bound already)")
    if args.max_body_bytes < 1:
        parser.error("--max-body-bytes must be positive")
    return args


def read_token(token_file: Path | None) -> str:
    """Return the gateway token from `token_file`, else from $SWARM_GATEWAY_TOKEN.

    Raises ValueError when there is none, or it is not one short printable line."""
    if token_file is not None:
        token = token_file.read_text().strip()
        where = str(token_file)
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        where = f"${TOKEN_ENV}"
    if not token:
        raise ValueError(f"no gateway token: set ${TOKEN_ENV} or pass --token-file "
                         "(manage.py create_gateway_token NAME prints one)")
    if len(token) > MAX_TOKEN_CHARS or not token.isprintable() or " " in token:
        raise ValueError(f"the gateway token in {where} is not a token")
    return token


class PassThroughApp:
    """/v2, /v1/ and /metrics to the gateway; everything else (and WebSockets) to the portal."""

    def __init__(self, gateway: GatewayApp, proxy: PortalProxy) -> None:
        self.gateway = gateway
        self.proxy = proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if is_gateway_path(path):
                await self.gateway(scope, receive, send)
                return
        await self.proxy(scope, receive, send)


def listening_socket(args: argparse.Namespace) -> socket.socket:
    """Return the socket to serve on: the inherited one, or a new one on host:port."""
    if args.fd is not None:
        return socket.socket(fileno=args.fd)  # family and type read from the descriptor
    family, kind, proto, _name, address = socket.getaddrinfo(
        args.host, args.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        _warn_unless_requests_migrate()
    sock.bind(address)
    sock.listen(LISTEN_BACKLOG)
    return sock


def _warn_unless_requests_migrate() -> None:
    """Warn that a stopping process resets the connections still queued on its own
    SO_REUSEPORT socket, unless the kernel moves them to a sibling (Linux >= 5.14)."""
    try:
        migrate = Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text().strip() == "1"
    except OSError:
        migrate = False
    if not migrate:
        log.warning("--reuse-port: connections queued on this process's socket when it stops "
                    "are reset; set net.ipv4.tcp_migrate_req=1, or share one socket (--fd, "
                    "as make run does), or retry in the balancer in front")


class GatewayServer(uvicorn.Server):
    """uvicorn's server with the gateway's start (table, gRPC) and a lossless stop."""

    def __init__(self, config: uvicorn.Config, gateway: GatewayApp, closers: list[Any],
                 grpc_port: int = 0, reuse_port: bool = True,
                 metrics_writer: SnapshotWriter | None = None) -> None:
        super().__init__(config)
        self.gateway = gateway
        self._closers = closers  # what to close last: the portal proxy and client
        self._metrics_writer = metrics_writer
        self._grpc_port = grpc_port
        self._reuse_port = reuse_port
        self._grpc: Any = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        # Load the table now, not on the first request (the refresh loop starts with it).
        await self.gateway.start()
        for closer in self._closers:  # with --tunnel-port: nodes behind NAT connect now
            if isinstance(closer, TunnelServer):
                await closer.start()
        if self._metrics_writer is not None:
            self._metrics_writer.start()
        if self._grpc_port:
            from serving.gateway.grpc_server import start_grpc  # grpc loaded only when asked

            host = self.config.host or "127.0.0.1"
            self._grpc = await start_grpc(self.gateway, host, self._grpc_port,
                                          reuse_port=self._reuse_port)
        # Everything loaded so far lives as long as the process: keep it out of the
        # collector's full passes, which otherwise walk ~37,000 objects (a tail-latency
        # spike of tens of ms on a busy machine) for nothing.
        gc.collect()
        gc.freeze()
        port: int = self.servers[0].sockets[0].getsockname()[1]
        print(f"GATEWAY READY port={port}", flush=True)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # new connections wait for a sibling, or in the backlog
        stopping = [asyncio.sleep(REQUEST_ARRIVAL_GRACE_S)]
        if self._grpc is not None:
            stopping.append(self._grpc.stop(GRPC_STOP_GRACE_S))
        await asyncio.gather(*stopping)
        await super().shutdown(sockets)
        if self._metrics_writer is not None:
            await self._metrics_writer.aclose()  # the final counts, once nothing is in flight
        await self.gateway.aclose()
        for closer in self._closers:
            await closer.aclose()


def metrics_writer(args: argparse.Namespace, gateway: GatewayApp, instance_id: str
                   ) -> SnapshotWriter | None:
    """Return the writer of this process's snapshot in --metrics-dir, with the gateway's
    /metrics made the sum over the directory; None without --metrics-dir (OSError when the
    directory cannot be made)."""
    if args.metrics_dir is None:
        return None
    args.metrics_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    shared = SharedMetrics(args.metrics_dir, instance_id)
    gateway.metrics.renderer = shared.render
    return SnapshotWriter(shared, gateway.metrics.frozen)


def build(args: argparse.Namespace, token: str
          ) -> tuple[Any, GatewayApp, list[Any], SnapshotWriter | None]:
    """Return the ASGI app to serve, the gateway in it, what to close at the end, and the
    writer of its metrics snapshot (with --metrics-dir)."""
    # The client also starts from the table saved at --table-cache when the portal is away.
    client = PortalClient(args.portal, token, uds_path=args.portal_uds,
                          table_cache_path=args.table_cache, instance_id=args.instance_id)
    gateway = GatewayApp(client, client, max_body_bytes=args.max_body_bytes,
                         metrics_enabled=True,
                         metrics_token=os.environ.get(METRICS_TOKEN_ENV) or None,
                         activator=client.activate)
    closers: list[Any] = [client]
    tunnels = attach_tunnels(args, gateway.fleet, gateway.pool,
                             lambda url: setattr(client, "tunnel_url", url))
    if tunnels is not None:
        closers.insert(0, tunnels)
    app: Any = gateway
    if args.pass_through:
        proxy = PortalProxy(args.portal, uds_path=args.portal_uds)
        closers.insert(0, proxy)
        app = PassThroughApp(gateway, proxy)
    return app, gateway, closers, metrics_writer(args, gateway, client.instance_id)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; return the exit code."""
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        token = read_token(args.token_file)
        app, gateway, closers, writer = build(args, token)
        sock = listening_socket(args)
    except (OSError, ValueError) as exc:
        print(f"swarm-gateway: {exc}", file=sys.stderr)
        return 2
    http: Any = "httptools" if args.http == "uvicorn" else \
        protocol_class(gateway, app if args.pass_through else None)
    config = uvicorn.Config(app, host=args.host, loop="none", http=http,
                            ws="auto", lifespan="off", access_log=False,
                            log_level=args.log_level, server_header=False, date_header=False,
                            timeout_keep_alive=KEEP_ALIVE_S, backlog=LISTEN_BACKLOG,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                            proxy_headers=False)  # X-Forwarded-For is for the portal to read
    server = GatewayServer(config, gateway, closers, args.grpc_port,
                           reuse_port=args.reuse_port or args.fd is not None,
                           metrics_writer=writer)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(server.serve(sockets=[sock]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
