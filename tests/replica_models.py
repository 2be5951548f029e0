"""Real models for the replica tests (built here with torch, seeded) and a process harness.

Each builder returns an eval-mode torch module; `save_*` write the archives the replica
loads; `start_replica` runs `python -m serving.replica` on a free port and waits, with a
deadline, until `/v2/health/ready` answers 200.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
KEY = "test-replica-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
START_DEADLINE_S = 60.0

MLP_SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 3]}],
}
CNN_SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 3, 32, 32]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
}
RECOMMENDER_ITEMS = 1000
RECOMMENDER_SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "item_ids", "datatype": "INT64", "shape": [-1, 8]},
               {"name": "dense", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "score", "datatype": "FP32", "shape": [-1, 1]},
                {"name": "top_item", "datatype": "INT64", "shape": [-1, 1]}],
}
SLOW_SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
}


def build_tabular_mlp(seed: int = 0) -> nn.Module:
    """Return an MLP: FP32 [-1, 4] -> FP32 [-1, 3]."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3)).eval()


class ImageCnn(nn.Module):
    """UINT8 images [-1, 3, 32, 32] -> FP32 logits [-1, 10]; converts to float inside."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(torch.float32) / 255.0
        return self.head(torch.flatten(self.features(x), 1))


def build_image_cnn(seed: int = 0) -> nn.Module:
    """Return the seeded image CNN."""
    torch.manual_seed(seed)
    return ImageCnn().eval()


class Recommender(nn.Module):
    """Item ids INT64 [-1, 8] + dense FP32 [-1, 4] -> score FP32 [-1, 1] and the best
    of the given items INT64 [-1, 1]. An id out of range makes the model raise."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.items = nn.EmbeddingBag(RECOMMENDER_ITEMS, 16, mode="mean")
        self.item_vectors = nn.Embedding(RECOMMENDER_ITEMS, 16)
        self.dense = nn.Linear(4, 16)
        self.score = nn.Linear(32, 1)

    def forward(self, item_ids: torch.Tensor, dense: torch.Tensor) -> Any:
        user = torch.relu(self.dense(dense))
        score = self.score(torch.cat([self.items(item_ids), user], dim=1))
        affinity = (self.item_vectors(item_ids) * user.unsqueeze(1)).sum(dim=2)
        top_item = item_ids.gather(1, affinity.argmax(dim=1, keepdim=True))
        if self.as_dict:
            return {"score": score, "top_item": top_item}
        return score, top_item


def build_recommender(seed: int = 0, as_dict: bool = False) -> nn.Module:
    """Return the seeded recommender (tuple outputs, or a dict keyed by output name)."""
    torch.manual_seed(seed)
    return Recommender(as_dict=as_dict).eval()


class SlowModel(nn.Module):
    """FP32 [-1, 4] -> [-1, 4] after `iterations` 256x256 matmuls: keeps requests in
    flight long enough to send a signal while they run."""

    def __init__(self, iterations: int) -> None:
        super().__init__()
        self.iterations = iterations
        self.up = nn.Linear(4, 256)
        self.mix = nn.Linear(256, 256)
        self.down = nn.Linear(256, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x).repeat(64, 1)
        for _ in range(self.iterations):
            h = torch.tanh(self.mix(h))
        return self.down(h[: x.shape[0]])


def build_slow_model(iterations: int, seed: int = 0) -> nn.Module:
    """Return the seeded slow model."""
    torch.manual_seed(seed)
    return SlowModel(iterations).eval()


def save_torchscript(module: nn.Module, path: Path) -> Path:
    """Write `module` as a TorchScript archive."""
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def save_torch_export(module: nn.Module, example_inputs: tuple[torch.Tensor, ...],
                      path: Path) -> Path:
    """Write `module` as a torch.export program with a dynamic batch dimension."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic_shapes = tuple({0: batch} for _ in example_inputs)
    program = torch.export.export(module, example_inputs, dynamic_shapes=dynamic_shapes)
    torch.export.save(program, str(path))
    return path


def free_port() -> int:
    """Return a TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ReplicaProcess:
    """A running replica server process."""

    process: subprocess.Popen[str]
    port: int
    stderr_path: Path
    ready_line: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> httpx.Client:
        """Return an httpx client that sends the replica key."""
        return httpx.Client(base_url=self.url, headers=AUTH, **{"timeout": 30, **kwargs})

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        """Drain and stop the process (kill it if it does not exit in time)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()


def replica_command(artifact: Path, artifact_format: str, signature_path: Path, port: int,
                    *, name: str = "model", version: int = 1, max_batch_size: int = 1,
                    max_queue_delay_ms: float = 0.0) -> list[str]:
    """Return the command line that starts a replica."""
    return [sys.executable, "-m", "serving.replica", "--artifact", str(artifact),
            "--format", artifact_format, "--model-name", name, "--model-version", str(version),
            "--signature-file", str(signature_path), "--host", "127.0.0.1", "--port", str(port),
            "--max-batch-size", str(max_batch_size),
            "--max-queue-delay-ms", str(max_queue_delay_ms), "--device", "cpu", "--threads", "1"]


def start_replica(directory: Path, artifact: Path, artifact_format: str,
                  signature: dict[str, Any], **options: Any) -> ReplicaProcess:
    """Start a replica and return once it is ready (fails the test if it never is)."""
    signature_path = directory / f"{artifact.stem}-signature.json"
    signature_path.write_text(json.dumps(signature))
    port = free_port()
    stderr_path = directory / f"{artifact.stem}-{port}.stderr"
    env = {**os.environ, "SWARM_REPLICA_KEY": KEY}
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            replica_command(artifact, artifact_format, signature_path, port, **options),
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    replica = ReplicaProcess(process, port, stderr_path)
    try:
        wait_until_ready(replica)
    except BaseException:
        replica.stop()
        raise
    assert replica.process.stdout is not None
    replica.ready_line = replica.process.stdout.readline().strip()
    return replica


def wait_until_ready(replica: ReplicaProcess, deadline_s: float = START_DEADLINE_S) -> None:
    """Poll /v2/health/ready until it answers 200, the process dies, or the deadline."""
    give_up_at = time.monotonic() + deadline_s
    with replica.client(timeout=2) as client:
        while time.monotonic() < give_up_at:
            if replica.process.poll() is not None:
                raise AssertionError(f"replica exited with {replica.process.returncode}:\n"
                                     f"{replica.stderr()}")
            try:
                if client.get("/v2/health/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    raise AssertionError(f"replica not ready within {deadline_s} s:\n{replica.stderr()}")
