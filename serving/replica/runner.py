"""Load a torch artifact and run forward passes on numpy arrays.

Every method here runs in the replica's one model worker thread: torch releases the GIL
inside kernels, and one thread keeps a CUDA context and its stream in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from registry.archive import ArchiveRefused, inspect_archive
from registry.model_loading import load_module
from registry.signature import TORCH_DTYPE_TO_DATATYPE, Signature, TensorSpec
from serving.replica.datatypes import NUMPY_DTYPES

WARM_UP_PASSES = 2  # TorchScript's profiling executor optimises after a couple of calls

logger = logging.getLogger("serving.replica")


class LoadError(Exception):
    """The artifact cannot be served (the process exits)."""


class ModelFailure(Exception):
    """The model raised, or returned something that does not match its signature."""


def is_batchable(signature: Signature) -> bool:
    """Return whether requests can be stacked along dim 0 (every tensor's dim 0 is -1)."""
    specs = signature.inputs + signature.outputs
    return all(spec.shape[0] == -1 for spec in specs)


class ModelRunner:
    """One loaded model on one device."""

    def __init__(self, artifact_path: str, artifact_format: str, device: str,
                 signature: Signature, threads: int) -> None:
        self.artifact_path = artifact_path
        self.artifact_format = artifact_format
        self.device = torch.device(device)
        self.signature = signature
        self.threads = threads
        self._module: Any = None

    def load(self, warm_up_rows: int) -> None:
        """Load the artifact and run warm-up passes; raise LoadError when that fails."""
        torch.set_num_threads(self.threads)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise LoadError(f"device {self.device} was asked for but CUDA is not available")
        try:
            self._module = self._load_module()
        except LoadError:
            raise
        except Exception as exc:
            raise LoadError(f"the {self.artifact_format} artifact {self.artifact_path} "
                            f"could not be loaded: {exc}") from exc
        try:
            for _ in range(WARM_UP_PASSES):
                self.forward(self._zeros(1))
        except ModelFailure as exc:
            raise LoadError(f"the warm-up forward pass failed: {exc}") from exc
        if warm_up_rows > 1 and is_batchable(self.signature):
            try:
                self.forward(self._zeros(warm_up_rows))
            except ModelFailure as exc:
                logger.warning("warm-up with %d rows failed: %s", warm_up_rows, exc)

    def _load_module(self) -> Any:
        # A worker never trusts the portal's earlier check: the same inspector runs here,
        # and the loader only takes what it returns (registry/archive.py).
        try:
            archive = inspect_archive(self.artifact_path, declared_format=self.artifact_format)
        except ArchiveRefused as exc:
            raise LoadError(f"the {self.artifact_format} artifact {self.artifact_path} could "
                            f"not be loaded: the archive inspector refused it: {exc}") from None
        return load_module(archive, str(self.device))

    def _zeros(self, rows: int) -> list[np.ndarray]:
        arrays = []
        for spec in self.signature.inputs:
            shape = spec.concrete_shape(1)
            if spec.shape[0] == -1:
                shape = (rows, *shape[1:])
            arrays.append(np.zeros(shape, dtype=NUMPY_DTYPES[spec.datatype]))
        return arrays

    def forward(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Return the outputs (signature order) for inputs in signature order."""
        tensors = [self._to_tensor(array, spec)
                   for array, spec in zip(arrays, self.signature.inputs, strict=True)]
        try:
            with torch.inference_mode():
                result = self._module(*tensors)
        except Exception as exc:
            raise ModelFailure(f"the model raised {type(exc).__name__}: "
                               f"{_first_line(exc)}") from exc
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
