"""The torch backend of the replica's runner: TorchScript and torch.export archives."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from serving.replica.runner import LoadError, ModelFailure, first_line
from swarm_protocol.archive import ArchiveRefused, inspect_archive
from swarm_protocol.model_loading import load_module
from swarm_protocol.signature import TORCH_DTYPE_TO_DATATYPE, Signature, TensorSpec


class TorchBackend:
    """A torch module on one device, fed and read as numpy arrays."""

    def __init__(self, artifact_path: str, artifact_format: str, device: str,
                 signature: Signature, threads: int) -> None:
        self.artifact_path = artifact_path
        self.artifact_format = artifact_format
        self.device = torch.device(device)
        self.signature = signature
        self.threads = threads
        self._module: Any = None

    def load(self) -> None:
        """Load the module through the archive inspector; raise LoadError."""
        torch.set_num_threads(self.threads)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise LoadError(f"device {self.device} was asked for but CUDA is not available")
        # A worker never trusts the portal's earlier check: the same inspector runs here,
        # and the loader only takes what it returns (swarm_protocol/archive.py).
        try:
            archive = inspect_archive(self.artifact_path, declared_format=self.artifact_format)
        except ArchiveRefused as exc:
            raise LoadError(f"the {self.artifact_format} artifact {self.artifact_path} could "
                            f"not be loaded: the archive inspector refused it: {exc}") from None
        self._module = load_module(archive, str(self.device))

    def forward(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Return the outputs (signature order) for inputs in signature order."""
        tensors = [self._to_tensor(array, spec)
                   for array, spec in zip(arrays, self.signature.inputs, strict=True)]
        try:
            with torch.inference_mode():
                result = self._module(*tensors)
        except Exception as exc:
            raise ModelFailure(f"the model raised {type(exc).__name__}: "
                               f"{first_line(exc)}") from exc
        outputs = self._flatten(result)
        return [self._to_numpy(output, spec)
                for output, spec in zip(outputs, self.signature.outputs, strict=True)]

    def _to_tensor(self, array: np.ndarray, spec: TensorSpec) -> torch.Tensor:
        if not array.flags.writeable:  # arrays over request bytes; torch wants writable
            array = array.copy()
        if spec.datatype == "BF16":
            tensor = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(array)
        if self.device.type != "cpu":
            tensor = tensor.to(self.device, non_blocking=True)
        return tensor

    def _flatten(self, result: Any) -> list[Any]:
        outputs: list[Any]
        if isinstance(result, torch.Tensor):
            outputs = [result]
        elif isinstance(result, (tuple, list)):
            outputs = list(result)
        elif isinstance(result, dict):
            missing = [s.name for s in self.signature.outputs if s.name not in result]
            if missing:
                raise ModelFailure(f"the model's output dict lacks {', '.join(missing)}")
            outputs = [result[spec.name] for spec in self.signature.outputs]
        else:
            raise ModelFailure(f"the model returned {type(result).__name__}, not tensors")
        if len(outputs) != len(self.signature.outputs):
            raise ModelFailure(f"the model returned {len(outputs)} outputs, the signature "
                               f"declares {len(self.signature.outputs)}")
        return outputs

    def _to_numpy(self, output: Any, spec: TensorSpec) -> np.ndarray:
        if not isinstance(output, torch.Tensor):
            raise ModelFailure(f"output {spec.name!r} is {type(output).__name__}, not a tensor")
        tensor = output.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        datatype = TORCH_DTYPE_TO_DATATYPE.get(str(tensor.dtype).removeprefix("torch."))
        if datatype != spec.datatype:
            raise ModelFailure(f"output {spec.name!r} is {tensor.dtype}, the signature says "
                               f"{spec.datatype}")
        if not spec.accepts_shape(tuple(tensor.shape)):
            raise ModelFailure(f"output {spec.name!r} has shape {list(tensor.shape)}, the "
                               f"signature says {list(spec.shape)}")
        tensor = tensor.contiguous()
        if datatype == "BF16":
            return tensor.view(torch.int16).numpy().view(np.uint16)
        return tensor.numpy()
