"""Benchmark one replica server: batched vs unbatched, at several concurrencies, in ONE run.

Run by hand (not a test), from the repository root:

    python bench/replica.py                 # 5 s per cell, concurrency 1, 16 and 64
    python bench/replica.py --format onnx   # the same MLP as ONNX, served by ONNX Runtime

The reference MLP (TorchScript, 64 -> 256 -> 256 -> 10, FP32, torch.manual_seed(0)) is
served by two replica processes started side by side on loopback, one batched
(--max-batch-size 32 --max-queue-delay-ms 2) and one unbatched (--max-batch-size 1), both
with --threads 1. For each concurrency the two are measured one after the other (an idle
replica costs nothing), so drift on a noisy machine hits both alike: compare the ratios.
The load generator is asyncio + aiohttp with keep-alive connections, one row per request,
JSON body.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import torch
from common import add_cell_options, median_round, stop

REPO_ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-replica-key-0123456789"
HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
SIGNATURE = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
             "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]}
CONFIGS = {"unbatched": ["--max-batch-size", "1", "--max-queue-delay-ms", "0"],
           "batched": ["--max-batch-size", "32", "--max-queue-delay-ms", "2"]}
READY_DEADLINE_S = 60.0


def reference_mlp() -> torch.nn.Sequential:
    """Return the reference MLP (64 -> 256 -> 256 -> 10, seeded)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    ).eval()


def save_reference_mlp(directory: Path, artifact_format: str = "torchscript") -> Path:
    """Write the reference MLP as TorchScript or ONNX (same weights); return its path."""
    if artifact_format == "onnx":
        return save_reference_onnx(directory)
    path = directory / "reference-mlp.pt"
    torch.jit.save(torch.jit.script(reference_mlp()), str(path))
    return path


def save_reference_onnx(directory: Path) -> Path:
    """Write the reference MLP as ONNX (Gemm/Relu, symbolic batch) with the onnx helpers."""
    from onnx import TensorProto, helper, numpy_helper, save_model

    layers = [m for m in reference_mlp() if isinstance(m, torch.nn.Linear)]
    nodes, initializers, current = [], [], "input"
    for i, layer in enumerate(layers):
        weight, bias = f"w{i}", f"b{i}"
        initializers += [numpy_helper.from_array(layer.weight.detach().numpy(), weight),
                         numpy_helper.from_array(layer.bias.detach().numpy(), bias)]
        out = "logits" if i == len(layers) - 1 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, weight, bias], [out], transB=1))
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
            out = f"r{i}"
        current = out
    graph = helper.make_graph(
        nodes, "reference-mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = directory / "reference-mlp.onnx"
    save_model(model, str(path))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Replica:
    name: str
    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def write_reference(directory: Path, artifact_format: str = "torchscript") -> tuple[Path, Path]:
    """Save the reference MLP and its signature in `directory`: (artifact, signature file)."""
    artifact = save_reference_mlp(directory, artifact_format)
    signature_path = directory / "signature.json"
    signature_path.write_text(json.dumps(SIGNATURE))
    return artifact, signature_path


def start_replica(name: str, artifact: Path, signature_path: Path,
                  artifact_format: str = "torchscript", config: str | None = None,
                  extra: Sequence[str] = ()) -> Replica:
    """Start a replica on a free loopback port with CONFIGS[config or name], then `extra`
    arguments (e.g. TLS files)."""
    port = free_port()
    command = [sys.executable, "-m", "serving.replica", "--artifact", str(artifact),
               "--format", artifact_format, "--model-name", "mlp", "--model-version", "1",
               "--signature-file", str(signature_path), "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu", "--threads", "1",
               *CONFIGS[config or name], *extra]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                               env={**os.environ, "SWARM_REPLICA_KEY": KEY})
    return Replica(name, process, port)


async def wait_ready(session: aiohttp.ClientSession, replica: Replica,
                     ssl_context: Any = None) -> None:
    """Wait for /v2/health/ready (over TLS when `ssl_context`), at most READY_DEADLINE_S."""
    url = replica.url.replace("http://", "https://") if ssl_context else replica.url
    give_up_at = time.monotonic() + READY_DEADLINE_S
    while time.monotonic() < give_up_at:
        if replica.process.poll() is not None:
            raise SystemExit(f"replica {replica.name} exited with {replica.process.returncode}")
        try:
            async with session.get(f"{url}/v2/health/ready",
                                   ssl=ssl_context or False) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise SystemExit(f"replica {replica.name} not ready within {READY_DEADLINE_S} s")


def request_body() -> bytes:
    row = np.random.default_rng(0).normal(size=64).astype(np.float32)
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                   "data": row.tolist()}]}).encode()


@dataclass
class Cell:
    replica: str
    concurrency: int
    requests: int
    errors: int
    duration_s: float
    latencies_ms: list[float]
    batches: int
    batched_rows: int

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s

    def latency_ms(self, fraction: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    @property
    def rows_per_batch(self) -> float:
        return self.batched_rows / self.batches if self.batches else 0.0


async def stats(session: aiohttp.ClientSession, replica: Replica) -> dict[str, Any]:
    async with session.get(f"{replica.url}/stats") as response:
        result: dict[str, Any] = await response.json()
        return result


@dataclass
class Load:
    """What one load cell saw: per-request latencies after the warm-up, errors, duration."""

    latencies_ms: list[float]
    errors: int
    elapsed_s: float


async def keep_in_flight(session: aiohttp.ClientSession, url: str, body: bytes,
                         concurrency: int, duration_s: float, warm_up_s: float,
                         on_measure: Callable[[], Awaitable[None]] | None = None) -> Load:
    """Keep `concurrency` requests in flight for `duration_s` after a warm-up.

    `on_measure` runs once when the warm-up ends (to read counters before the cell).
    Shared by bench/replica.py and bench/gateway.py so both load the same way.
    """
    latencies_ms: list[float] = []
    errors = 0
    measuring = False
    stop_at = time.monotonic() + warm_up_s + duration_s

    async def worker() -> None:
        nonlocal errors
        while (started := time.monotonic()) < stop_at:
            async with session.post(url, data=body) as response:
                await response.read()
                ok = response.status == 200
            if measuring:
                latencies_ms.append((time.monotonic() - started) * 1000.0)
                errors += not ok

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(warm_up_s)
    if on_measure is not None:
        await on_measure()
    measuring, started_s = True, time.monotonic()
    await asyncio.gather(*workers)
    return Load(latencies_ms, errors, time.monotonic() - started_s)


async def drive(replica: Replica, concurrency: int, duration_s: float, warm_up_s: float,
                body: bytes) -> Cell:
    """Load one replica for one cell; count its batches from /stats."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    # Stats go over their own session: the load's connector has no spare connection.
    async with aiohttp.ClientSession(connector=connector, headers=HEADERS) as session, \
            aiohttp.ClientSession(headers=HEADERS) as stats_session:
        before: dict[str, Any] = {}

        async def read_before() -> None:
            before.update(await stats(stats_session, replica))

        load = await keep_in_flight(session, f"{replica.url}/v2/models/mlp/infer", body,
                                    concurrency, duration_s, warm_up_s, read_before)
        after = await stats(stats_session, replica)
    return Cell(replica.name, concurrency, len(load.latencies_ms), load.errors, load.elapsed_s,
                load.latencies_ms, after["batches"] - before["batches"],
                after["batched_rows"] - before["batched_rows"])


def print_report(cells: list[Cell], args: argparse.Namespace) -> None:
    print(f"\nreplica benchmark ({args.format}): {args.duration_s} s per cell, concurrency "
          f"{', '.join(map(str, args.concurrency))}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs\n")
    print("| replica | concurrency | requests/s | p50 ms | p99 ms | rows per forward | errors |")
    print("|---|---|---|---|---|---|---|")
    for cell in cells:
        print(f"| {cell.replica} | {cell.concurrency} | {cell.requests_per_s:,.0f} | "
              f"{cell.latency_ms(0.5):.2f} | {cell.latency_ms(0.99):.2f} | "
              f"{cell.rows_per_batch:.1f} | {cell.errors} |")
    print("\n| concurrency | batched / unbatched requests/s | batched p50 - unbatched p50 |")
    print("|---|---|---|")
    for concurrency in args.concurrency:
        pair = {c.replica: c for c in cells if c.concurrency == concurrency}
        batched, unbatched = pair["batched"], pair["unbatched"]
        print(f"| {concurrency} | {batched.requests_per_s / unbatched.requests_per_s:.2f}x | "
              f"{batched.latency_ms(0.5) - unbatched.latency_ms(0.5):+.3f} ms |")


async def run(args: argparse.Namespace) -> list[Cell]:
    body = request_body()
    with tempfile.TemporaryDirectory() as directory:
        artifact, signature_path = write_reference(Path(directory), args.format)
        replicas = [start_replica(name, artifact, signature_path, args.format)
                    for name in CONFIGS]
        try:
            async with aiohttp.ClientSession(headers=HEADERS) as session:
                for replica in replicas:
                    await wait_ready(session, replica)
            cells = []
            for concurrency in args.concurrency:
                for replica in replicas:
                    rounds = [await drive(replica, concurrency, args.duration_s,
                                          args.warm_up_s, body) for _ in range(args.rounds)]
                    cells.append(median_round(rounds))
                    print(f"  {replica.name:9} c={concurrency:<3} "
                          f"{cells[-1].requests_per_s:8.0f} req/s", file=sys.stderr)
            return cells
        finally:
            stop(replica.process for replica in replicas)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cell_options(parser, rounds=1)
    parser.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript",
                        help="serve the reference MLP as TorchScript or as ONNX")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        cells = asyncio.run(run(args))
    else:
        cells = uvloop.run(run(args))
    print_report(cells, args)


if __name__ == "__main__":
    main()
