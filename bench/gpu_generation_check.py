"""Check the generation engine on a GPU: greedy answers on `cuda` equal the CPU's, batched or alone.

Run by hand on a machine with an NVIDIA GPU and the worker installed (see bench/gpu_check.py),
from the repository root:

    python bench/gpu_generation_check.py     # exit 0 only if every answer matches
    python bench/gpu_generation_check.py cpu # the same run with both replicas on the CPU

It builds the tiny demo causal LM (registry/demo_lm.py), starts two real replica processes
(`python -m serving.replica --format hf_causal_lm`), one with `--device cuda:0` and one on the
CPU, and sends the same 8 greedy `generate` requests (48 tokens, ignore_eos) to each: first
all 8 at once (continuous batching), then one at a time on the GPU. Every text must be
identical across the three runs. The tiny model's random weights make near-ties between
logits rare but possible; a mismatch prints the first differing prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from generation import KEY, PROMPTS, start_replica

from registry.demo_lm import cached_tiny_lm_archive

MAX_TOKENS = 48


async def generate(port: int, prompt: str, client: httpx.AsyncClient) -> str:
    """Return one greedy answer's text."""
    body = {"text_input": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True}
    reply = await client.post(f"http://127.0.0.1:{port}/v2/models/tiny/generate", json=body)
    reply.raise_for_status()
    return str(reply.json()["text_output"])


async def answers(port: int, together: bool) -> tuple[list[str], float]:
    """Return the 8 prompts' answers (all at once or one by one) and the wall seconds."""
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"},
                                 timeout=300) as client:
        await generate(port, "warm up", client)
        started = time.monotonic()
        if together:
            texts = list(await asyncio.gather(*(generate(port, p, client) for p in PROMPTS)))
        else:
            texts = [await generate(port, p, client) for p in PROMPTS]
    return texts, time.monotonic() - started


def main() -> int:
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"cuda {torch.cuda.is_available()}", flush=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("device", nargs="?", default="cuda:0",
                        help="the first replica's torch device (cuda:0; cpu to try it here)")
    device = parser.parse_args().device
    archive = cached_tiny_lm_archive()
    with tempfile.TemporaryDirectory(prefix="gpu-generation-") as folder:
        gpu = start_replica(archive, Path(folder) / "gpu", 18751, 16, device)
        cpu = start_replica(archive, Path(folder) / "cpu", 18752, 16, "cpu")
        try:
            gpu_batched, gpu_batched_s = asyncio.run(answers(18751, together=True))
            gpu_alone, gpu_alone_s = asyncio.run(answers(18751, together=False))
            cpu_batched, cpu_batched_s = asyncio.run(answers(18752, together=True))
        finally:
            for process in (gpu, cpu):
                process.terminate()
                process.wait(timeout=30)
    print(f"{device}, 8 at once: {gpu_batched_s:.2f} s; {device}, one at a time: "
          f"{gpu_alone_s:.2f} s; cpu, 8 at once: {cpu_batched_s:.2f} s ({MAX_TOKENS} tokens each)")
    print(f"first answer on {device}: {gpu_batched[0][:60]!r}")
    failed = 0
    for prompt, a, b, c in zip(PROMPTS, gpu_batched, gpu_alone, cpu_batched, strict=True):
        if not a == b == c:
            failed += 1
            print(f"MISMATCH for {prompt!r}:\n  cuda batched {a!r}\n  cuda alone   {b!r}\n"
                  f"  cpu batched  {c!r}")
    print(f"greedy answers identical ({device} batched = {device} alone = cpu): "
          f"{len(PROMPTS) - failed}/{len(PROMPTS)}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
