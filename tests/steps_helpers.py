"""Models, images and processes for the BYTES, steps and recommendation tests.

The colour classifier's answer is designed: its logits are 10x the mean of each colour
channel, so a red picture is "red" whatever the compression did to it.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from serving.gateway.filesource import write_table
from serving.gateway.routes import VersionInfo
from tests.gateway_helpers import StandaloneGateway, deployment, replica_route, table
from tests.replica_models import (
    KEY,
    REPO_ROOT,
    ReplicaProcess,
    free_port,
    replica_command,
    save_torchscript,
    wait_until_ready,
)

IMAGE_SIDE = 8
COLORS = ("red", "green", "blue")
CLASSIFIER_SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, IMAGE_SIDE, IMAGE_SIDE]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}],
}
CLASSIFIER_STEPS: dict[str, Any] = {
    "inputs": [{"input": "image", "name": "image_bytes", "decode": "image", "color": "RGB",
                "layout": "CHW", "scale": 1 / 255}],
    "outputs": [{"output": "logits", "softmax": True, "top_k": 2, "scores": "scores",
                 "labels": "labels", "indices": "class_ids"}],
    "labels": list(COLORS),
}


class MeanColor(nn.Module):
    """FP32 images [-1, 3, H, W] -> logits [-1, 3]: 10x each channel's mean."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.mean(dim=(2, 3)) * 10.0


def color_classifier(directory: Path) -> Path:
    """Write the colour classifier as TorchScript; return its path."""
    return save_torchscript(MeanColor().eval(), directory / "colors.pt")


def image_bytes(rgb: tuple[int, int, int], fmt: str, size: tuple[int, int] = (40, 30)) -> bytes:
    """Return a solid-colour picture encoded as JPEG or PNG."""
    buffer = io.BytesIO()
    Image.new("RGB", size, rgb).save(buffer, format=fmt)
    return buffer.getvalue()


def bomb_png(side: int = 5000) -> bytes:
    """Return a small PNG (a few KiB) that decodes to side x side pixels."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 0).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def start_with_steps(directory: Path, artifact: Path, signature: dict[str, Any],
                     steps: dict[str, Any] | None, **options: Any) -> ReplicaProcess:
    """Start a replica of `artifact` with a steps file; return it once ready."""
    signature_path = directory / f"{artifact.stem}-signature.json"
    signature_path.write_text(json.dumps(signature))
    port = free_port()
    command = replica_command(artifact, "torchscript", signature_path, port, **options)
    if steps is not None:
        steps_path = directory / f"{artifact.stem}-steps.json"
        steps_path.write_text(json.dumps(steps))
        command += ["--steps-file", str(steps_path)]
    stderr_path = directory / f"{artifact.stem}-{port}.stderr"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                   stderr=stderr, text=True,
                                   env={**os.environ, "SWARM_REPLICA_KEY": KEY})
    replica = ReplicaProcess(process, port, stderr_path)
    try:
        wait_until_ready(replica)
    except BaseException:
        replica.stop()
        raise
    return replica


def served_info(replica: ReplicaProcess) -> VersionInfo:
    """Return the gateway's metadata for a replica, read from the replica itself."""
    with replica.client() as client:
        metadata = client.get("/v2/models/" + _model_name(replica)).json()
    return VersionInfo(metadata["platform"], metadata["inputs"], metadata["outputs"])


def _model_name(replica: ReplicaProcess) -> str:
    argv = replica.process.args
    assert isinstance(argv, list)
    return str(argv[argv.index("--model-name") + 1])


@contextmanager
def gateway_for(directory: Path, *replicas: ReplicaProcess) -> Iterator[StandaloneGateway]:
    """Run a standalone gateway whose table routes each replica's model to it."""
    routes = [deployment(_model_name(replica), [replica_route(replica, index + 1)],
                         info=served_info(replica))
              for index, replica in enumerate(replicas)]
    path = directory / "table.json"
    write_table(path, table(*routes))
    gateway = StandaloneGateway(path)
    try:
        yield gateway
    finally:
        gateway.stop()
