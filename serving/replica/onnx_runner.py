"""The ONNX Runtime backend of the replica's runner.

The file passes the same archive inspector as in the portal (no external data, no
custom-op domains, size limits) and the session is built by `swarm_protocol.model_loading`
from the bytes that were checked. Providers: CUDA when the device is cuda and the
installed onnxruntime has it, else the CPU (with a warning); intra-op threads from the
replica's --threads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from serving.replica.artifact_backend import ArtifactBackend
from serving.replica.datatypes import NUMPY_DTYPES
from serving.replica.runner import LoadError, ModelFailure, first_line
from swarm_protocol.archive import FORMAT_ONNX
from swarm_protocol.model_loading import CUDA_PROVIDER, load_onnx_session
from swarm_protocol.signature import Signature, TensorSpec

logger = logging.getLogger("serving.replica")
# numpy has no bfloat16 and ONNX Runtime takes no raw bits for it; BYTES would need str.
UNSUPPORTED = frozenset({"BF16", "BYTES"})
_DATATYPE_OF = {dtype: datatype for datatype, dtype in NUMPY_DTYPES.items()
                if datatype not in UNSUPPORTED}


class OnnxBackend(ArtifactBackend):
    """An onnxruntime.InferenceSession fed and read as numpy arrays."""

    artifact_format = FORMAT_ONNX

    def __init__(self, artifact_path: str, device: str, signature: Signature,
                 threads: int) -> None:
        super().__init__(artifact_path, device, signature, threads)
        self._session: Any = None
        self._output_names = [spec.name for spec in signature.outputs]

    def load(self) -> None:
        """Inspect the file, build the session and check the signature's names; LoadError."""
        unsupported = [spec.name for spec in self.signature.inputs + self.signature.outputs
                       if spec.datatype in UNSUPPORTED]
        if unsupported:
            raise LoadError(f"ONNX tensors {', '.join(unsupported)}: BF16 and BYTES are not "
                            "served through ONNX Runtime here")
        self._session = load_onnx_session(self.inspected(), self.device, self.threads)
        if self.device.startswith("cuda") and CUDA_PROVIDER not in self._session.get_providers():
            logger.warning("device %s asked for, but this onnxruntime has no CUDA provider: "
                           "serving on the CPU", self.device)
        self._check_names()

    def _check_names(self) -> None:
        graph_inputs = {value.name for value in self._session.get_inputs()}
        graph_outputs = {value.name for value in self._session.get_outputs()}
        for kind, specs, names in (("input", self.signature.inputs, graph_inputs),
                                   ("output", self.signature.outputs, graph_outputs)):
            for spec in specs:
                if spec.name not in names:
                    raise LoadError(f"the signature's {kind} {spec.name!r} is not in the ONNX "
                                    f"graph ({', '.join(sorted(names))})")

    @property
    def providers(self) -> list[str]:
        """Return the providers the session runs on, preferred first."""
        return list(self._session.get_providers()) if self._session is not None else []

    def forward(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Return the outputs (signature order) for inputs in signature order."""
        feeds = {spec.name: np.ascontiguousarray(array)
                 for spec, array in zip(self.signature.inputs, arrays, strict=True)}
        try:
            results = self._session.run(self._output_names, feeds)
        except Exception as exc:
            raise ModelFailure(f"the model raised {type(exc).__name__}: "
                               f"{first_line(exc)}") from exc
        return [_checked(result, spec)
                for result, spec in zip(results, self.signature.outputs, strict=True)]


def _checked(result: Any, spec: TensorSpec) -> np.ndarray:
    if not isinstance(result, np.ndarray):
        raise ModelFailure(f"output {spec.name!r} is {type(result).__name__}, not a tensor")
    datatype = _DATATYPE_OF.get(result.dtype.newbyteorder("<")
                                if result.dtype.byteorder == ">" else result.dtype)
    if datatype != spec.datatype:
        raise ModelFailure(f"output {spec.name!r} is {result.dtype}, the signature says "
                           f"{spec.datatype}")
    if not spec.accepts_shape(tuple(result.shape)):
        raise ModelFailure(f"output {spec.name!r} has shape {list(result.shape)}, the "
                           f"signature says {list(spec.shape)}")
    return result
