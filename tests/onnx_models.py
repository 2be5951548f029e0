"""ONNX models built by our own code with the `onnx` helper API (no model hub, no exporter).

The MLP carries the weights of `registry.demo.build_mlp`, so its outputs can be compared
with the torch module's. The hostile variants each break one rule of the inspector.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper, save_model

from registry.demo import DEMO_CLASSES, DEMO_FEATURES, build_mlp

OPSET = 17
PRODUCER = ("swarm-tests", "1.0")
ONNX_SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, DEMO_FEATURES]}],
    "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, DEMO_CLASSES]}],
}


def mlp_weights(seed: int, hidden: int = 16) -> list[np.ndarray]:
    """Return [w1, b1, w2, b2] of the demo MLP (torch's Linear layout: out x in)."""
    module = build_mlp(hidden, seed)
    return [
        tensor.detach().numpy().copy() for tensor in
        (module[0].weight, module[0].bias, module[2].weight, module[2].bias)]


def mlp_model(seed: int = 0, hidden: int = 16, batch: str | int = "batch",
              domain_ops: list[Any] | None = None) -> Any:
    """Return the MLP as a ModelProto: features [batch, 4] FP32 -> scores [batch, 3] FP32."""
    names = ["w1", "b1", "w2", "b2"]
    initializers = [numpy_helper.from_array(array, name)
                    for array, name in zip(mlp_weights(seed, hidden), names, strict=True)]
    nodes = [
        helper.make_node("Gemm", ["features", "w1", "b1"], ["hidden"], transB=1),
        helper.make_node("Relu", ["hidden"], ["relu"]),
        helper.make_node("Gemm", ["relu", "w2", "b2"], ["scores"], transB=1),
        *(domain_ops or []),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, DEMO_FEATURES])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, DEMO_CLASSES])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name=PRODUCER[0], producer_version=PRODUCER[1])
    model.ir_version = 8  # what onnxruntime of these years reads
    return model


def save(model: Any, path: Path) -> Path:
    """Write a ModelProto as one .onnx file (weights inside)."""
    save_model(model, str(path))
    return path


def mlp_onnx(path: Path, seed: int = 0, hidden: int = 16) -> Path:
    """Write the demo MLP as ONNX with a symbolic batch dimension."""
    return save(mlp_model(seed, hidden), path)


def with_external_data(path: Path, location: str = "../../../etc/passwd") -> Path:
    """Write the MLP with its first weight pointing at a file outside the model."""
    model = mlp_model()
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "256")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    return save(model, path)


def with_custom_domain(path: Path, domain: str = "com.example.native") -> Path:
    """Write the MLP plus one operator of a domain only a shared library could run."""
    node = helper.make_node("Pwn", ["scores"], ["unused"], domain=domain)
    model = mlp_model(domain_ops=[node])
    model.opset_import.append(helper.make_opsetid(domain, 1))
    return save(model, path)


def with_ep_context(path: Path) -> Path:
    """Write the MLP plus an EPContext node that names a compiled blob by path."""
    node = helper.make_node("EPContext", ["features"], ["ctx"], domain="com.microsoft",
                            embed_mode=0, ep_cache_context="/etc/shadow")
    model = mlp_model(domain_ops=[node])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return save(model, path)


def with_huge_constant(path: Path, elements: int = 2**40) -> Path:
    """Write the MLP with a Constant whose dims declare far more than it holds."""
    tensor = TensorProto(name="huge", data_type=TensorProto.FLOAT, dims=[elements],
                         raw_data=b"\0" * 4)
    node = helper.make_node("Constant", [], ["huge_out"], value=tensor)
    return save(mlp_model(domain_ops=[node]), path)


def expected_scores(rows: np.ndarray, seed: int = 0) -> np.ndarray:
    """Return the torch MLP's outputs for the same weights."""
    import torch

    with torch.no_grad():
        return build_mlp(16, seed)(torch.from_numpy(rows)).numpy()
