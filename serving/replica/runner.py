"""Load a model artifact and run forward passes on numpy arrays, whatever its format.

`ModelRunner` holds what every format shares (the signature, warm-up passes, the errors
the engine understands) and delegates loading and running to a backend: torch
(`torch_runner`, TorchScript and torch.export) or ONNX Runtime (`onnx_runner`). A backend
takes numpy arrays in signature order and returns numpy arrays in signature order, whose
datatypes and shapes it has checked against the signature.

Every method here runs in the replica's one model worker thread: the runtimes release the
GIL inside kernels, and one thread keeps a CUDA context and its stream in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from serving.replica.datatypes import NUMPY_DTYPES
from swarm_protocol.signature import Signature

WARM_UP_PASSES = 2  # TorchScript's profiling executor optimises after a couple of calls
ONNX_FORMAT = "onnx"
HF_CAUSAL_LM_FORMAT = "hf_causal_lm"

logger = logging.getLogger("serving.replica")


class LoadError(Exception):
    """The artifact cannot be served (the process exits)."""


class ModelFailure(Exception):
    """The model raised, or returned something that does not match its signature."""


class Backend(Protocol):
    """One runtime's part: load the file, then run numpy inputs to numpy outputs."""

    def load(self) -> None:
        """Load the artifact through the archive inspector; raise LoadError."""

    def forward(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Return outputs in signature order, checked; raise ModelFailure."""


def is_batchable(signature: Signature) -> bool:
    """Return whether requests can be stacked along dim 0 (every tensor's dim 0 is -1)."""
    specs = signature.inputs + signature.outputs
    return all(spec.shape[0] == -1 for spec in specs)


def make_backend(artifact_path: str, artifact_format: str, device: str,
                 signature: Signature, threads: int) -> Backend:
    """Return the backend for the format (its runtime imported only here)."""
    if artifact_format == HF_CAUSAL_LM_FORMAT:
        from serving.replica.generation_runner import GenerationBackend

        return GenerationBackend(artifact_path, device, signature, threads)
    if artifact_format == ONNX_FORMAT:
        from serving.replica.onnx_runner import OnnxBackend

        return OnnxBackend(artifact_path, device, signature, threads)
    from serving.replica.torch_runner import TorchBackend

    return TorchBackend(artifact_path, artifact_format, device, signature, threads)


class ModelRunner:
    """One loaded model on one device."""

    def __init__(self, artifact_path: str, artifact_format: str, device: str,
                 signature: Signature, threads: int) -> None:
        self.artifact_path = artifact_path
        self.artifact_format = artifact_format
        self.signature = signature
        self.threads = threads
        self.backend = make_backend(artifact_path, artifact_format, device, signature, threads)

    def load(self, warm_up_rows: int) -> None:
        """Load the artifact and run warm-up passes; raise LoadError when that fails."""
        try:
            self.backend.load()
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
        return self.backend.forward(arrays)


def first_line(exc: BaseException) -> str:
    """Return the first line of an exception's text, at most 500 characters."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
