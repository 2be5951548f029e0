"""Benchmark the tunnel: the gateway reaching a replica directly vs through a node's tunnel.

Run by hand (not a test), from the repository root:

    python bench/tunnel.py                  # 5 s per cell, concurrency 1, 16 and 64

One batched replica of the reference MLP (bench/replica.py) on loopback, and two gateways
built like `serving.gateway.standalone` (file table, lean HTTP server, metrics on), each in
its own process: `direct` routes to the replica's port; `tunnel` lists the same replica as a
tunnel node's and runs a tunnel server (serving/gateway/tunnel.py), to which a third process
plays the node's agent (serving/agent/tunnel.TunnelClient, its key from the environment)
and pipes each stream to the replica. So the tunnel path has one more process and two more
loopback hops (gateway -> WebSocket -> agent -> replica; the gateway's pool reaches the
tunnel in process) where production has the network between gateway and agent instead.
The targets alternate for `--rounds` rounds and each cell reports the median round
(bench/gateway.py's method and load generator: wrk when installed). Goal (issue 12): at
most +0.3 ms p50 at concurrency 1 and at least 0.8 of direct throughput at 16 and 64.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
from common import (
    add_cell_options,
    load_average,
    print_cell_table,
    print_ratio_table,
    print_run_line,
    stop,
)
from gateway import (  # bench/gateway.py: the same load generator, cells and table
    GATEWAY_HEADERS,
    Cell,
    Target,
    add_client_options,
    measure,
    wait_proxy,
    write_table,
)
from replica import HEADERS as REPLICA_HEADERS
from replica import free_port, request_body, start_replica, wait_ready, write_reference

REPO_ROOT = Path(__file__).resolve().parent.parent
NODE_ID = 1
KEY_ENV = "BENCH_TUNNEL_KEY"
AGENT = "agent"


def write_tunnel_table(direct: Path, path: Path, key: str) -> None:
    """Write the direct table with its replica made a tunnel node's."""
    table = json.loads(direct.read_text())
    for replica in table["deployments"]["mlp"]["replicas"]:
        replica.update(node_id=NODE_ID, tunnel=True)
    table["tunnels"] = {str(NODE_ID): hashlib.sha256(key.encode()).hexdigest()}
    path.write_text(json.dumps(table))


def serve_gateway(table: str, port: int, tunnel_port: int) -> None:
    """Run a standalone gateway on `port`, with a tunnel server on `tunnel_port` (0: none)."""
    import uvicorn
    import uvloop

    from serving.gateway import standalone
    from serving.gateway.fast_http import protocol_class
    from serving.gateway.tunnel import TunnelServer

    args = standalone.parse_args(["--table", table, "--port", str(port)])
    app = standalone.build_app(args)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, loop="none",
                            http=protocol_class(app), lifespan="off", access_log=False,
                            log_level="warning", server_header=False, date_header=False,
                            timeout_keep_alive=standalone.KEEP_ALIVE_S, backlog=2048)

    async def serve() -> None:
        if tunnel_port:
            tunnels = TunnelServer(app.fleet, app.pool, "127.0.0.1", tunnel_port)  # table next
            await app.start()  # the table first: it holds the node's key digest
            await tunnels.start()
        await uvicorn.Server(config).serve()

    uvloop.run(serve())


def serve_agent(url: str, replica_port: int) -> None:
    """Play the node's agent: keep its tunnel to `url` open, streams to the replica."""
    import uvloop

    from serving.agent.tunnel import TunnelClient

    client = TunnelClient(url, NODE_ID, os.environ[KEY_ENV], {replica_port})
    uvloop.run(client.run())


def start(*arguments: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start this script in a serving mode; its log lines go to bench-tunnel-<mode>.log in
    the temporary directory of the run's working files (printed when a cell has errors)."""
    return subprocess.Popen([sys.executable, __file__, *arguments], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL)


async def run(args: argparse.Namespace) -> list[Cell]:
    body = request_body()
    key = os.urandom(32).hex()
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        artifact, signature_path = write_reference(folder)
        replica = start_replica("batched", artifact, signature_path)
        direct_table, tunnel_table = folder / "direct.json", folder / "tunnel.json"
        write_table(direct_table, replica.port)
        write_tunnel_table(direct_table, tunnel_table, key)
        direct_port, tunnel_port, tunnel_ws_port = free_port(), free_port(), free_port()
        processes = {
            "direct": start("--serve-gateway", str(direct_table), str(direct_port), "0"),
            "tunnel": start("--serve-gateway", str(tunnel_table), str(tunnel_port),
                            str(tunnel_ws_port)),
            AGENT: start("--serve-agent", f"ws://127.0.0.1:{tunnel_ws_port}/tunnel",
                         str(replica.port), env={**os.environ, KEY_ENV: key}),
        }
        targets = [Target("direct", f"http://127.0.0.1:{direct_port}", GATEWAY_HEADERS),
                   Target("tunnel", f"http://127.0.0.1:{tunnel_port}", GATEWAY_HEADERS)]
        try:
            async with aiohttp.ClientSession(headers=REPLICA_HEADERS) as session:
                await wait_ready(session, replica)
                for target in targets:
                    await wait_proxy(session, target, processes[target.name], body)
            pids = {"replica": replica.process.pid,
                    **{name: process.pid for name, process in processes.items()}}
            return await measure(targets, args, body, pids, folder)
        finally:
            stop([*processes.values(), replica.process])


def print_report(cells: list[Cell], args: argparse.Namespace) -> None:
    print_run_line("tunnel", args)
    print_cell_table(cells, "path", ["gateway CPU us/req", "agent CPU us/req"], lambda cell: [
        f"{cell.cpu_us_per_request(cell.target):.0f}",
        f"{cell.cpu_us_per_request(AGENT):.0f}" if cell.target == "tunnel" else "-"])
    print_ratio_table(cells, args.concurrency, "direct", "tunnel", "tunnel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cell_options(parser)
    add_client_options(parser)
    parser.add_argument("--serve-gateway", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--serve-agent", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_gateway or args.serve_agent:
        logging.basicConfig(level=os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
                            format="%(asctime)s %(process)d %(name)s: %(message)s")
    if args.serve_gateway:
        table, port, tunnel_port = args.serve_gateway
        serve_gateway(table, int(port), int(tunnel_port))
        return
    if args.serve_agent:
        serve_agent(args.serve_agent[0], int(args.serve_agent[1]))
        return
    args.load_before = load_average()
    print_report(asyncio.run(run(args)), args)


if __name__ == "__main__":
    main()
