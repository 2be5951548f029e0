"""Benchmark the gateway: one replica direct vs through the standalone gateway, in ONE run.

Run by hand (not a test), from the repository root:

    python bench/gateway.py                 # 5 s per cell, concurrency 1, 16 and 64

The reference MLP (TorchScript, 64 -> 256 -> 256 -> 10, FP32, torch.manual_seed(0), built by
bench/replica.py) is served by one batched replica (--max-batch-size 32
--max-queue-delay-ms 2, --threads 1) on loopback. The gateway runs as
`python -m serving.gateway.standalone` with a one-deployment table, an API key (sha256
lookup, no rate limit) and metrics on. For each concurrency the targets alternate
(direct, gateway, direct, gateway, ...) for `--rounds` rounds and each cell reports the
median round, so drift on a noisy machine hits both alike: compare the ratios.

The load generator is `wrk` when it is installed (`--client wrk`, the default then): C, one
thread, keep-alive connections, one row per request, JSON body, a Lua hook that counts every
answer that is not 200. It costs a few microseconds per request, so it leaves the 2 cores to
the replica and the gateway. `--client aiohttp` is the older asyncio + aiohttp generator
(shared with bench/replica.py), which uses most of a core itself: against the gateway it
makes three busy processes on two cores where direct has two, and understates the ratio.

`--grpc` also serves OIP gRPC from the same gateway process (`--grpc-port`) and adds a
`grpc` target: the same row as a raw FP32 tensor (`raw_input_contents`, no JSON), the answer
as `raw_output_contents`, from an asyncio load loop on the generated stub (grpc.aio, one
HTTP/2 channel, `concurrency` calls in flight) in this process. That client costs far
more CPU per request than wrk and shares the 2 cores with the gateway, so also compare
against REST from a Python client (`--client aiohttp`): the `client CPU` column shows it.

`--compare-uvicorn` adds the same gateway served by uvicorn's own HTTP protocol
(`--http uvicorn`) beside the lean one it serves with by default (fast_http.py).

`--compare-bare` adds the reference proxies of bench/bare_proxies.py as targets (a forward
with no auth, balancing or metrics): a callback-only floor, the gateway's own HTTP server
and pool with nothing else, uvicorn on the pool, uvicorn with aiohttp. They show what the
hop itself costs in Python here, what the gateway's logic adds, and why it has its own
HTTP server and pool.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import torch
from bare_proxies import BARE_PROXIES  # bench/bare_proxies.py: the reference proxies
from common import add_cell_options, load_average, median_round, stop
from gateway_load import (  # bench/gateway_load.py: targets, cells and the wrk load generator
    INFER_PATH,
    Cell,
    Target,
    cpu_s,
    drive_wrk,
    percentiles,
)
from replica import (  # bench/replica.py: the same model, replica and request as its benchmark
    HEADERS as REPLICA_HEADERS,
)
from replica import (
    KEY,
    READY_DEADLINE_S,
    SIGNATURE,
    free_port,
    keep_in_flight,
    request_body,
    start_replica,
    wait_ready,
    write_reference,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
API_KEY = "swk_bench_gateway_key"
GATEWAY_HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
GRPC = "grpc"  # the gateway's gRPC port, as a target of its own
UVICORN_GATEWAY = "gateway-uvicorn"  # the gateway on uvicorn's HTTP protocol (--compare-uvicorn)
CLIENTS = ("wrk", "aiohttp")


def write_table(path: Path, replica_port: int) -> None:
    """Write the gateway's routing table: one deployment, one replica, one API key."""
    info = {"platform": "pytorch_torchscript", **SIGNATURE}
    table = {
        "revision": "bench",
        "deployments": {"mlp": {
            "name": "mlp", "deployment_id": 1, "weights": {"1": 1.0}, "versions": {"1": info},
            "replicas": [{"replica_id": 1, "host": "127.0.0.1", "port": replica_port,
                          "replica_key": KEY, "version": 1}],
            "max_in_flight_per_replica": 1024, "queue_limit": 1024,
        }},
        "api_keys": {hashlib.sha256(API_KEY.encode()).hexdigest(): {
            "key_id": 1, "digest": hashlib.sha256(API_KEY.encode()).hexdigest(),
            "deployments": ["mlp"], "expires_at_s": None, "rate_limit_rps": None}},
    }
    path.write_text(json.dumps(table))


def start_proxy(name: str, table_path: Path, replica_port: int, port: int,
                grpc_port: int = 0) -> subprocess.Popen[bytes]:
    """Start the gateway (with gRPC on `grpc_port` if set), or a bare proxy
    (bench/bare_proxies.py)."""
    if name in ("gateway", UVICORN_GATEWAY):
        command = [sys.executable, "-m", "serving.gateway.standalone", "--table",
                   str(table_path), "--port", str(port)]
        command += ["--http", "uvicorn"] if name == UVICORN_GATEWAY else \
            ["--grpc-port", str(grpc_port)]
    else:
        command = [sys.executable, str(Path(__file__).with_name("bare_proxies.py")), name,
                   "--port", str(port), "--upstream-port", str(replica_port)]
    return subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)


async def wait_proxy(session: aiohttp.ClientSession, target: Target,
                     process: subprocess.Popen[bytes], body: bytes) -> None:
    give_up_at = time.monotonic() + READY_DEADLINE_S
    while time.monotonic() < give_up_at:
        if process.poll() is not None:
            raise SystemExit(f"{target.name} exited with {process.returncode}")
        try:
            async with session.post(f"{target.url}{INFER_PATH}", data=body,
                                    headers=target.headers) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise SystemExit(f"{target.name} did not get ready")


def grpc_stub(address: str) -> tuple[Any, Any, Any]:
    """Return a grpc.aio channel to `address`, its OIP stub, and the benchmark's request."""
    sys.path.insert(0, str(REPO_ROOT))  # run as a script: bench/ is on the path, not the root
    import grpc
    import numpy as np

    from serving.gateway.proto import grpc_predict_v2_pb2 as pb
    from serving.gateway.proto import grpc_predict_v2_pb2_grpc as pb_grpc

    row = np.random.default_rng(0).normal(size=64).astype(np.float32)  # request_body's row
    request = pb.ModelInferRequest(model_name="mlp", raw_input_contents=[row.tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    channel = grpc.aio.insecure_channel(address)
    return channel, pb_grpc.GRPCInferenceServiceStub(channel), request


async def drive_grpc(target: Target, concurrency: int, args: argparse.Namespace,
                     pids: dict[str, int]) -> Cell:
    """One cell over gRPC: keep `concurrency` ModelInfer calls in flight on one channel."""
    import grpc

    channel, stub, request = grpc_stub(target.url)
    metadata = (("authorization", f"Bearer {API_KEY}"),)
    latencies_ms: list[float] = []
    errors = 0
    measuring = False
    stop_at = time.monotonic() + args.warm_up_s + args.duration_s

    async def worker() -> None:
        nonlocal errors
        while (started := time.monotonic()) < stop_at:
            try:
                await stub.ModelInfer(request, metadata=metadata)
                ok = True
            except grpc.aio.AioRpcError:
                ok = False
            if measuring:
                latencies_ms.append((time.monotonic() - started) * 1000.0)
                errors += not ok

    async with channel:
        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        await asyncio.sleep(args.warm_up_s)
        cpu_before = {name: cpu_s(pid) for name, pid in pids.items()}
        client_before_s = time.process_time()
        measuring, started_s = True, time.monotonic()
        await asyncio.gather(*workers)
        elapsed_s = time.monotonic() - started_s
    used = {name: cpu_s(pid) - cpu_before[name] for name, pid in pids.items()}
    used["client"] = time.process_time() - client_before_s
    used[GRPC] = used["gateway"]  # the same process serves both
    return Cell(target.name, concurrency, len(latencies_ms), errors, elapsed_s,
                percentiles(latencies_ms), used)


async def wait_grpc(target: Target, process: subprocess.Popen[bytes]) -> None:
    """Wait until the gateway answers a gRPC inference."""
    import grpc

    channel, stub, request = grpc_stub(target.url)
    metadata = (("authorization", f"Bearer {API_KEY}"),)
    give_up_at = time.monotonic() + READY_DEADLINE_S
    async with channel:
        while time.monotonic() < give_up_at:
            if process.poll() is not None:
                raise SystemExit(f"the gateway exited with {process.returncode}")
            try:
                await stub.ModelInfer(request, metadata=metadata, timeout=5)
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)
    raise SystemExit("the gateway's gRPC port did not get ready")


async def drive(target: Target, concurrency: int, args: argparse.Namespace, body: bytes,
                pids: dict[str, int], scripts: Path) -> Cell:
    """Load one target for one cell; measure each process's CPU over it."""
    if target.name == GRPC:
        return await drive_grpc(target, concurrency, args, pids)
    if args.client == "wrk":
        return drive_wrk(target, concurrency, args, body, pids, scripts)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=target.headers) as session:
        cpu_before: dict[str, float] = {}

        async def read_before() -> None:
            cpu_before.update({name: cpu_s(pid) for name, pid in pids.items()},
                              client=time.process_time())

        load = await keep_in_flight(session, f"{target.url}{INFER_PATH}", body,
                                    concurrency, args.duration_s, args.warm_up_s, read_before)
        used = {name: cpu_s(pid) - cpu_before[name] for name, pid in pids.items()}
        used["client"] = time.process_time() - cpu_before["client"]
    return Cell(target.name, concurrency, len(load.latencies_ms), load.errors, load.elapsed_s,
                percentiles(load.latencies_ms), used)


async def measure(targets: list[Target], args: argparse.Namespace, body: bytes,
                  pids: dict[str, int], scripts: Path) -> list[Cell]:
    cells: list[Cell] = []
    for concurrency in args.concurrency:
        rounds: dict[str, list[Cell]] = {t.name: [] for t in targets}
        for _ in range(args.rounds):
            for target in targets:  # alternate: direct, gateway, direct, gateway, ...
                rounds[target.name].append(await drive(
                    target, concurrency, args, body, pids, scripts))
        for target in targets:
            cells.append(median_round(rounds[target.name]))
            print(f"  {target.name:8} c={concurrency:<3} {cells[-1].requests_per_s:8.0f} req/s "
                  f"p50 {cells[-1].latency_ms(0.5):.3f} ms", file=sys.stderr)
    return cells


async def run(args: argparse.Namespace) -> list[Cell]:
    body = request_body()
    with tempfile.TemporaryDirectory() as directory:
        artifact, signature_path = write_reference(Path(directory))
        replica = start_replica("batched", artifact, signature_path)
        table_path = Path(directory) / "table.json"
        write_table(table_path, replica.port)
        targets = [Target("direct", replica.url, REPLICA_HEADERS)]
        processes: dict[str, subprocess.Popen[bytes]] = {}
        grpc_port = free_port() if args.grpc else 0
        for name in ("gateway", *((UVICORN_GATEWAY,) if args.compare_uvicorn else ()),
                     *(BARE_PROXIES if args.compare_bare else ())):
            port = free_port()
            processes[name] = start_proxy(name, table_path, replica.port, port, grpc_port)
            headers = GATEWAY_HEADERS if name in ("gateway", UVICORN_GATEWAY) \
                else REPLICA_HEADERS
            targets.append(Target(name, f"http://127.0.0.1:{port}", headers))
        if grpc_port:
            targets.insert(2, Target(GRPC, f"127.0.0.1:{grpc_port}", {}))
        try:
            async with aiohttp.ClientSession(headers=REPLICA_HEADERS) as session:
                await wait_ready(session, replica)
                for target in targets[1:]:
                    if target.name == GRPC:
                        await wait_grpc(target, processes["gateway"])
                    else:
                        await wait_proxy(session, target, processes[target.name], body)
            pids = {"replica": replica.process.pid,
                    **{name: process.pid for name, process in processes.items()}}
            return await measure(targets, args, body, pids, Path(directory))
        finally:
            stop([*processes.values(), replica.process])


def print_report(cells: list[Cell], args: argparse.Namespace) -> None:
    client = "wrk (1 thread)" if args.client == "wrk" and args.wrk_threads == 1 \
        else f"wrk ({args.wrk_threads} threads)" if args.client == "wrk" else "aiohttp"
    grpc_client = "; grpc from grpc.aio in the benchmark process" if args.grpc else ""
    print(f"\ngateway benchmark: {args.duration_s} s per cell, median of {args.rounds} "
          f"alternating round(s), concurrency {', '.join(map(str, args.concurrency))}, "
          f"load from {client}{grpc_client}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {args.load_before} before and {load_average()} after\n")
    print("| target | concurrency | requests/s | p50 ms | p99 ms | errors "
          "| replica CPU us/req | proxy CPU us/req | client CPU us/req |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cell in cells:
        proxy_cpu = (f"{cell.cpu_us_per_request(cell.target):.0f}"
                     if cell.target != "direct" else "-")
        print(f"| {cell.target} | {cell.concurrency} | {cell.requests_per_s:,.0f} | "
              f"{cell.latency_ms(0.5):.2f} | {cell.latency_ms(0.99):.2f} | {cell.errors} | "
              f"{cell.cpu_us_per_request('replica'):.0f} | {proxy_cpu} | "
              f"{cell.cpu_us_per_request('client'):.0f} |")
    print("\n| concurrency | target | requests/s vs direct | p50 - direct p50 |")
    print("|---|---|---|---|")
    for concurrency in args.concurrency:
        row = {c.target: c for c in cells if c.concurrency == concurrency}
        direct = row.pop("direct")
        for name, cell in row.items():
            print(f"| {concurrency} | {name} | {cell.requests_per_s / direct.requests_per_s:.2f}"
                  f" | {cell.latency_ms(0.5) - direct.latency_ms(0.5):+.3f} ms |")


def add_client_options(parser: argparse.ArgumentParser, default: str = "wrk") -> None:
    """Add --client (the load generator, one of CLIENTS) and --wrk-threads."""
    parser.add_argument("--client", choices=CLIENTS, default=default,
                        help=f"load generator (default: {default})")
    parser.add_argument("--wrk-threads", type=int, default=1,
                        help="wrk threads (at most one per connection)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cell_options(parser)
    add_client_options(parser, default="wrk" if shutil.which("wrk") else "aiohttp")
    parser.add_argument("--grpc", action="store_true",
                        help="also measure the gateway's OIP gRPC port (grpc.aio client)")
    parser.add_argument("--compare-uvicorn", action="store_true",
                        help=f"add `{UVICORN_GATEWAY}`: the same gateway on uvicorn's HTTP "
                             "protocol instead of the lean one (serving/gateway/fast_http.py)")
    parser.add_argument("--compare-bare", action="store_true",
                        help="also measure bare proxies for reference (bench/bare_proxies.py)")
    args = parser.parse_args()
    if args.client == "wrk" and shutil.which("wrk") is None:
        parser.error("wrk is not installed (apt-get install wrk), or use --client aiohttp")
    args.load_before = load_average()
    try:
        import uvloop
    except ImportError:
        cells = asyncio.run(run(args))
    else:
        cells = uvloop.run(run(args))
    print_report(cells, args)


if __name__ == "__main__":
    main()
