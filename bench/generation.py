"""Benchmark generation at the replica: continuous batching against one sequence at a time.

Run by hand (not a test), from the repository root:

    python bench/generation.py               # 16 streams x 128 tokens, 3 rounds of both modes

It builds the tiny demo causal LM (registry/demo_lm.py, cached), starts a real replica
process (`python -m serving.replica --format hf_causal_lm`, one torch thread) once with
SWARM_REPLICA_MAX_SEQUENCES=16 (continuous batching) and once with 1 (one sequence at a
time: the others wait in the queue), and opens 16 concurrent `generate_stream` requests
(greedy, ignore_eos, max_tokens each) with different prompts, in alternating rounds
(both replicas run side by side; medians are reported). It reports tokens per second
over the whole run (completion tokens from each stream's final usage / wall time), time to
first token (request sent -> first SSE event) p50/p99, and inter-event time p50/p99. An
event is one text delta: usually one token, several when a character spans tokens (the
tiny model's byte-level gibberish often does), so the inter-token figure is also given
as the mean per stream: (last event - first event) / (completion tokens - 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from registry.demo_lm import cached_tiny_lm_archive  # noqa: E402
from swarm_protocol.archive_hf import TEXT_SIGNATURE  # noqa: E402

KEY = "bench-generation-key-0123456789"
PROMPTS = ["Hello, world.", "The portal keeps a registry", "A swarm is many small workers",
           "What is a token?", "The river runs to the sea", "Safety first:",
           "The scheduler decides", "Sampling turns scores"]


@dataclass
class StreamResult:
    """One stream's timings (seconds, monotonic) and token count."""

    sent_s: float
    event_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0


def percentile(values: list[float], q: float) -> float:
    """Return the q-th percentile (0-100) by nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def start_replica(archive: Path, folder: Path, port: int, max_sequences: int,
                  device: str = "cpu") -> subprocess.Popen[str]:
    """Start a replica process serving the tiny model; return it once ready."""
    folder.mkdir(parents=True, exist_ok=True)
    signature = folder / "signature.json"
    signature.write_text(json.dumps(TEXT_SIGNATURE))
    env = {**os.environ, "SWARM_REPLICA_KEY": KEY,
           "SWARM_REPLICA_MAX_SEQUENCES": str(max_sequences)}
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.replica", "--artifact", str(archive),
         "--format", "hf_causal_lm", "--model-name", "tiny", "--model-version", "1",
         "--signature-file", str(signature), "--port", str(port), "--threads", "1",
         "--device", device],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()  # "REPLICA READY port=N", or "" when it died
    if not line.startswith("REPLICA READY"):
        process.kill()
        raise SystemExit(f"the replica did not start (exit {process.wait()})")
    return process


async def one_stream(client: httpx.AsyncClient, prompt: str, max_tokens: int
                     ) -> StreamResult:
    """Run one generate_stream request; return its timings."""
    body = {"text_input": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    result = StreamResult(time.monotonic())
    async with client.stream("POST", "/v2/models/tiny/generate_stream", json=body) as reply:
        if reply.status_code != 200:
            raise SystemExit(f"{reply.status_code}: {(await reply.aread())[:200]!r}")
        async for line in reply.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line.removeprefix("data: "))
            if event.get("text_output"):
                result.event_s.append(time.monotonic())
            if "usage" in event:
                result.completion_tokens = event["usage"]["completion_tokens"]
    return result


async def run_load(port: int, streams: int, max_tokens: int) -> tuple[float, list[StreamResult]]:
    """Return (wall seconds, results) of `streams` concurrent streams."""
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits,
                                 headers={"Authorization": f"Bearer {KEY}"},
                                 timeout=600) as client:
        await one_stream(client, "warm up", 8)
        started = time.monotonic()
        results = await asyncio.gather(*(one_stream(client, PROMPTS[i % len(PROMPTS)],
                                                    max_tokens) for i in range(streams)))
    return time.monotonic() - started, list(results)


def summarize(label: str, wall_s: float, results: list[StreamResult]) -> dict[str, float]:
    """Print and return the figures of one mode."""
    tokens = sum(result.completion_tokens for result in results)
    ttft_ms = [(r.event_s[0] - r.sent_s) * 1000 for r in results if r.event_s]
    gaps_ms = [(b - a) * 1000 for r in results
               for a, b in zip(r.event_s, r.event_s[1:], strict=False)]
    mean_itl_ms = [(r.event_s[-1] - r.event_s[0]) * 1000 / max(1, r.completion_tokens - 1)
                   for r in results if len(r.event_s) > 1]
    figures = {"tokens_per_s": tokens / wall_s, "wall_s": wall_s, "tokens": tokens,
               "ttft_p50_ms": percentile(ttft_ms, 50), "ttft_p99_ms": percentile(ttft_ms, 99),
               "event_gap_p50_ms": percentile(gaps_ms, 50),
               "event_gap_p99_ms": percentile(gaps_ms, 99),
               "itl_mean_p50_ms": percentile(mean_itl_ms, 50),
               "itl_mean_p99_ms": percentile(mean_itl_ms, 99)}
    print(f"{label:<28} " + "  ".join(f"{k}={v:.1f}" for k, v in figures.items()), flush=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of both modes (medians reported)")
    parser.add_argument("--port", type=int, default=18731)
    parser.add_argument("--device", default="cpu", help="the replicas' torch device (cuda:0)")
    args = parser.parse_args()
    archive = cached_tiny_lm_archive()
    print(f"load average before: {os.getloadavg()}", flush=True)
    modes = (("continuous batching (16)", 16), ("one sequence at a time (1)", 1))
    rounds: dict[int, list[dict[str, float]]] = {16: [], 1: []}
    with tempfile.TemporaryDirectory(prefix="bench-generation-") as folder:
        processes = {size: start_replica(archive, Path(folder) / str(size), args.port + i,
                                         size, args.device)
                     for i, (_, size) in enumerate(modes)}
        try:
            # Alternating rounds: a burst of load from other processes hits both modes.
            for _ in range(args.rounds):
                for i, (label, size) in enumerate(modes):
                    wall_s, results = asyncio.run(run_load(args.port + i, args.streams,
                                                           args.max_tokens))
                    rounds[size].append(summarize(label, wall_s, results))
        finally:
            for process in processes.values():
                process.terminate()
                process.wait(timeout=30)
    ratios = sorted(a["tokens_per_s"] / b["tokens_per_s"]
                    for a, b in zip(rounds[16], rounds[1], strict=True))
    for label, size in modes:
        median = {key: percentile([r[key] for r in rounds[size]], 50)
                  for key in rounds[size][0]}
        print(f"median of {args.rounds} rounds, {label}: "
              + "  ".join(f"{k}={v:.1f}" for k, v in median.items()))
    print(f"continuous batching / one at a time, tokens per second, per round: "
          f"{', '.join(f'{r:.2f}x' for r in ratios)} (median {percentile(ratios, 50):.2f}x)")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
