"""Check a GPU server: the worker's replica serves a real model on `cuda`, NVML reads real GPUs.

Run by hand on a machine with an NVIDIA GPU and the worker installed (`pip install ./worker`
into a Python 3.10-3.13 that already has a CUDA build of torch), from the repository root:

    python bench/gpu_check.py              # exit 0 only if both checks pass

1. NVML: every GPU the agent would report (`serving.agent.devices.NvmlBackend`): name,
   memory, utilisation, temperature, power.
2. The replica: the reference MLP (bench/replica.py, TorchScript) served by
   `python -m serving.replica --device cuda:0` on loopback; 200 requests of 8 rows in
   JSON, answers compared with the same model on the CPU (max abs difference),
   p50/p99 latency; then NVML again, which should list the replica's process and its GPU
   memory under the GPU it runs on.
Prints one block per check; writes nothing outside a temporary folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from replica import KEY, SIGNATURE, free_port, reference_mlp, save_reference_mlp

from serving.agent.devices import DeviceBackendError, NvmlBackend, load_pynvml

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUESTS = 200
ROWS = 8


def nvml_report() -> bool:
    """Print every GPU NVML sees; return whether there is at least one."""
    try:
        backend = NvmlBackend(load_pynvml())
    except DeviceBackendError as error:
        print(f"NVML: unavailable ({error})")
        return False
    devices = backend.devices()
    for device in devices:
        processes = ", ".join(f"pid {p.pid}: {(p.memory_used_bytes or 0) / 2**20:.0f} MiB"
                              for p in device.processes) or "none"
        print(f"NVML: GPU {device.index} {device.name} {device.uuid}: memory "
              f"{device.memory_used_bytes / 2**30:.2f}/{device.memory_total_bytes / 2**30:.1f} "
              f"GiB, utilisation {device.utilization_pct:.0f} %, temperature "
              f"{device.temperature_c} C, power {device.power_w} W; processes: {processes}")
    backend.shutdown()
    return bool(devices)


def serve_on_cuda(directory: Path) -> bool:
    """Serve the reference MLP on cuda:0; print accuracy against the CPU and latency."""
    if not torch.cuda.is_available():
        print(f"replica: torch {torch.__version__} sees no CUDA device")
        return False
    artifact = save_reference_mlp(directory)
    signature = directory / "signature.json"
    signature.write_text(json.dumps(SIGNATURE))
    port = free_port()
    command = [sys.executable, "-m", "serving.replica", "--artifact", str(artifact),
               "--format", "torchscript", "--model-name", "mlp", "--model-version", "1",
               "--signature-file", str(signature), "--host", "127.0.0.1", "--port", str(port),
               "--device", "cuda:0", "--max-batch-size", "32", "--max-queue-delay-ms", "2"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ,
                                                            "SWARM_REPLICA_KEY": KEY})
    try:
        return _exercise(port)
    finally:
        process.terminate()
        process.wait(timeout=30)


def _exercise(port: int) -> bool:
    url = f"http://127.0.0.1:{port}/v2/models/mlp"
    client = httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    deadline_s = time.monotonic() + 120
    while time.monotonic() < deadline_s:
        try:
            if client.get(f"{url}/ready").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    else:
        print("replica: not ready on cuda within 120 s")
        return False
    rows = np.random.default_rng(0).standard_normal((ROWS, 64)).astype(np.float32)
    # The same seeded network built again, in memory: only swarm_protocol.model_loading
    # loads model files (a test keeps it so).
    expected = reference_mlp()(torch.from_numpy(rows)).detach().numpy()
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [ROWS, 64],
                        "data": rows.ravel().tolist()}]}
    latencies_ms, worst = [], 0.0
    for _ in range(REQUESTS):
        started = time.perf_counter()
        answer = client.post(f"{url}/infer", json=body)
        latencies_ms.append((time.perf_counter() - started) * 1000)
        answer.raise_for_status()
        got = np.array(answer.json()["outputs"][0]["data"], np.float32).reshape(ROWS, 10)
        worst = max(worst, float(np.abs(got - expected).max()))
    latencies_ms.sort()
    print(f"replica: {torch.cuda.get_device_name(0)}, torch {torch.__version__}: "
          f"{REQUESTS} requests of {ROWS} rows, max |cuda - cpu| {worst:.2e}, p50 "
          f"{latencies_ms[len(latencies_ms) // 2]:.2f} ms, p99 "
          f"{latencies_ms[int(len(latencies_ms) * 0.99)]:.2f} ms")
    print("NVML while the replica runs:")
    nvml_report()
    return worst < 1e-3


def main() -> int:
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}")
    gpus = nvml_report()
    with tempfile.TemporaryDirectory() as directory:
        served = serve_on_cuda(Path(directory))
    print(f"NVML {'ok' if gpus else 'FAILED'}; replica on cuda {'ok' if served else 'FAILED'}")
    return 0 if gpus and served else 1


if __name__ == "__main__":
    sys.exit(main())
