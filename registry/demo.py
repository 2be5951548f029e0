"""The demo model: a small TorchScript MLP that our own code builds (no model hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEMO_MODEL_NAME = "demo-mlp"
DEMO_FEATURES = 4
DEMO_CLASSES = 3
DEMO_SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, DEMO_FEATURES]}],
    "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, DEMO_CLASSES]}],
}


def build_mlp(hidden: int = 16, seed: int = 0) -> Any:
    """Return a seeded MLP (features -> scores) as a torch module in eval mode."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(DEMO_FEATURES, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, DEMO_CLASSES),
    ).eval()


def save_torchscript(path: Path, hidden: int = 16, seed: int = 0) -> Path:
    """Write the MLP as a TorchScript archive (torch.jit.save)."""
    import torch

    torch.jit.save(torch.jit.script(build_mlp(hidden, seed)), str(path))
    return path


def save_torch_export(path: Path, hidden: int = 16, seed: int = 0) -> Path:
    """Write the MLP as a torch.export program (.pt2) with a dynamic batch dimension."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(build_mlp(hidden, seed), (torch.zeros(2, DEMO_FEATURES),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path
