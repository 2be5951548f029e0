"""`python -m serving.gateway.standalone --table table.json --port P`: the gateway alone.

Serves the gateway with a FileTableSource on uvicorn's server and the lean HTTP/1.1
protocol (fast_http.py; `--http uvicorn`: uvicorn's own, to compare), for tests and
benchmarks, and OIP gRPC on the same event loop with `--grpc-port P` (started before the
HTTP port, so it listens by the time the ready line appears). Prints `GATEWAY READY port=N`
once listening (N is the real port with --port 0).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn
import uvloop

from serving.balancing import BalancerConfig
from serving.gateway.app import DEFAULT_MAX_BODY_BYTES, GatewayApp
from serving.gateway.fast_http import protocol_class
from serving.gateway.filesource import FileTableSource
from serving.gateway.grpc_server import GRACE_S, start_grpc

METRICS_TOKEN_ENV = "SWARM_GATEWAY_METRICS_TOKEN"  # noqa: S105  (a variable name)
KEEP_ALIVE_S = 75


class _Server(uvicorn.Server):
    """uvicorn's server, printing the ready line once the port is bound."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            port: int = self.servers[0].sockets[0].getsockname()[1]
            print(f"GATEWAY READY port={port}", flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Return the command line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", required=True, help="RouteTable JSON file (watched)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--grpc-port", type=int, default=0, help="OIP gRPC port (0: off)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--no-metrics", action="store_true", help="turn /metrics off")
    parser.add_argument("--http", choices=("lean", "uvicorn"), default="lean",
                        help="the lean HTTP/1.1 server (fast_http.py) or uvicorn's")
    parser.add_argument("--ejection-base-s", type=float,
                        default=BalancerConfig().ejection_base_s,
                        help="first back-off of an ejected replica")
    return parser.parse_args(argv)


def build_app(args: argparse.Namespace) -> GatewayApp:
    """Return the gateway app for these options."""
    base_s = args.ejection_base_s
    config = BalancerConfig(ejection_base_s=base_s,
                            ejection_max_s=max(base_s, BalancerConfig().ejection_max_s))
    return GatewayApp(FileTableSource(args.table), None, max_body_bytes=args.max_body_bytes,
                      metrics_enabled=not args.no_metrics,
                      metrics_token=os.environ.get(METRICS_TOKEN_ENV) or None,
                      balancer_config=config)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until interrupted; return the exit code."""
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(args)
    http: Any = protocol_class(app) if args.http == "lean" else "httptools"
    config = uvicorn.Config(app, host=args.host, port=args.port, loop="none", http=http,
                            lifespan="off", access_log=False,
                            log_level="warning", server_header=False, date_header=False,
                            timeout_keep_alive=KEEP_ALIVE_S, backlog=2048,
                            proxy_headers=False)  # nothing in front of it to trust
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(config, app, args.grpc_port))
    return 0


async def _serve(config: uvicorn.Config, app: GatewayApp, grpc_port: int) -> None:
    """Serve HTTP (and gRPC when `grpc_port` is set) until interrupted."""
    grpc_server = None
    if grpc_port:
        grpc_server = await start_grpc(app, config.host, grpc_port)
    try:
        await _Server(config).serve()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(GRACE_S)


if __name__ == "__main__":
    sys.exit(main())
