"""Benchmark the gateway's added time to first token on generation streams, in ONE run.

Run by hand (not a test), from the repository root:

    python bench/generation_gateway.py        # 3 alternating rounds of each cell

It builds the tiny demo causal LM (registry/demo_lm.py, cached), starts one real replica
process (`python -m serving.replica --format hf_causal_lm`, continuous batching, 16 slots)
and the standalone gateway (`python -m serving.gateway.standalone`, the lean HTTP/1.1
server) in front of it with a one-deployment table and an API key. Then, in alternating
rounds so that load from elsewhere hits both targets alike:

- `sequential`: `--requests` generate_stream requests one after another (8 tokens each),
  straight to the replica and through the gateway. Time to first token (TTFT) is measured
  from the request being sent to the first SSE event with text; p50/p99 of each target,
  and the difference of the p50s is the gateway's added TTFT.
- `16 streams`: 16 concurrent streams of 64 tokens; TTFT p50/p99 and the mean gap between
  events per stream, direct and through the gateway.

Both clients use one keep-alive httpx connection per stream slot, so no connection setup is
timed. The gateway's `/metrics` histogram of TTFT is printed too (its own view, from the
request's start to the first body byte out).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from generation import (  # noqa: E402
    KEY,
    PROMPTS,
    StreamResult,
    one_stream,
    percentile,
    start_replica,
)

from registry.demo_lm import cached_tiny_lm_archive  # noqa: E402
from swarm_protocol.archive_hf import TEXT_SIGNATURE  # noqa: E402

API_KEY = "swk_bench-generation-gateway-0123456789"
READY_DEADLINE_S = 60.0


def write_table(path: Path, replica_port: int) -> None:
    """Write the gateway's routing table: the tiny LM on one replica, one API key."""
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    info = {"platform": "transformers_causal_lm", **TEXT_SIGNATURE}
    path.write_text(json.dumps({
        "revision": "bench",
        "deployments": {"tiny": {
            "name": "tiny", "deployment_id": 1, "weights": {"1": 1.0}, "versions": {"1": info},
            "replicas": [{"replica_id": 1, "host": "127.0.0.1", "port": replica_port,
                          "replica_key": KEY, "version": 1}],
            "max_in_flight_per_replica": 1024, "queue_limit": 1024}},
        "api_keys": {digest: {"key_id": 1, "digest": digest, "deployments": ["tiny"],
                              "expires_at_s": None, "rate_limit_rps": None}}}))


def start_gateway(table: Path, port: int) -> subprocess.Popen[bytes]:
    """Start the standalone gateway; return it once it prints its ready line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.gateway.standalone", "--table", str(table),
         "--port", str(port)], cwd=REPO_ROOT, stdout=subprocess.PIPE)
    assert process.stdout is not None
    if not process.stdout.readline().startswith(b"GATEWAY READY"):
        process.kill()
        raise SystemExit(f"the gateway did not start (exit {process.wait()})")
    return process


def client_for(url: str, bearer: str, streams: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=120,
                             limits=httpx.Limits(max_connections=streams + 2),
                             headers={"Authorization": f"Bearer {bearer}"})


async def sequential(url: str, bearer: str, requests: int) -> list[StreamResult]:
    async with client_for(url, bearer, 1) as client:
        await one_stream(client, "warm up", 2)
        return [await one_stream(client, PROMPTS[i % len(PROMPTS)], 8)
                for i in range(requests)]


async def concurrent(url: str, bearer: str, streams: int) -> list[StreamResult]:
    async with client_for(url, bearer, streams) as client:
        await one_stream(client, "warm up", 2)
        return list(await asyncio.gather(*(one_stream(client, PROMPTS[i % len(PROMPTS)], 64)
                                           for i in range(streams))))


def figures(results: list[StreamResult]) -> dict[str, float]:
    ttft_ms = [(r.event_s[0] - r.sent_s) * 1000 for r in results if r.event_s]
    gap_ms = [(r.event_s[-1] - r.event_s[0]) * 1000 / (len(r.event_s) - 1)
              for r in results if len(r.event_s) > 1]
    return {"ttft_p50_ms": percentile(ttft_ms, 50), "ttft_p99_ms": percentile(ttft_ms, 99),
            "event_gap_mean_p50_ms": percentile(gap_ms, 50)}


def gateway_ttft_histogram(url: str) -> str:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return "\n".join(line for line in text.splitlines()
                     if line.startswith("swarm_gateway_time_to_first_token_seconds_")
                     and ("_sum" in line or "_count" in line))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=100,
                        help="sequential streams per target per round")
    parser.add_argument("--port", type=int, default=18761)
    args = parser.parse_args()
    archive = cached_tiny_lm_archive()
    print(f"load average before: {os.getloadavg()}", flush=True)
    targets = {"direct": (f"http://127.0.0.1:{args.port}", KEY),
               "gateway": (f"http://127.0.0.1:{args.port + 1}", API_KEY)}
    cells: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-generation-gateway-") as folder:
        replica = start_replica(archive, Path(folder) / "replica", args.port, 16)
        write_table(Path(folder) / "table.json", args.port)
        gateway = start_gateway(Path(folder) / "table.json", args.port + 1)
        try:
            for _ in range(args.rounds):
                for name, (url, bearer) in targets.items():
                    for cell, run in (("sequential", sequential(url, bearer, args.requests)),
                                      ("16 streams", concurrent(url, bearer, 16))):
                        found = figures(asyncio.run(run))
                        cells.setdefault((cell, name), []).append(found)
                        print(f"{cell:<11} {name:<8} " + "  ".join(
                            f"{k}={v:.2f}" for k, v in found.items()), flush=True)
            print(gateway_ttft_histogram(targets["gateway"][0]))
        finally:
            for process in (gateway, replica):
                process.terminate()
                process.wait(timeout=30)
    print(f"\nmedian of {args.rounds} rounds; load average after: {os.getloadavg()}\n")
    print("| cell | target | TTFT p50 ms | TTFT p99 ms | mean event gap p50 ms |")
    print("|---|---|---|---|---|")
    medians = {key: {k: percentile([r[k] for r in rounds], 50) for k in rounds[0]}
               for key, rounds in cells.items()}
    for (cell, name), found in medians.items():
        print(f"| {cell} | {name} | {found['ttft_p50_ms']:.2f} | {found['ttft_p99_ms']:.2f} | "
              f"{found['event_gap_mean_p50_ms']:.2f} |")
    for cell in ("sequential", "16 streams"):
        added = medians[(cell, "gateway")]["ttft_p50_ms"] - medians[(cell, "direct")][
            "ttft_p50_ms"]
        print(f"{cell}: the gateway's added TTFT at p50: {added:+.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
