"""Load an uploaded artifact in a throw-away process and check it against its signature.

Run as `python -m registry.inspect_child`, with a JSON request on stdin and one JSON
line on stdout. The portal never loads user files itself: this process does, under a
time and memory limit that the parent enforces. No Django here.

Without a declared signature the one the file states is used (ONNX graph, torch.export
example shapes, TorchScript plus an example input); with one, it is checked against it.
ONNX models run in ONNX Runtime here, as in the replica.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from swarm_protocol import signature_infer
from swarm_protocol.archive import (
    FORMAT_HF_CAUSAL_LM,
    FORMAT_ONNX,
    FORMAT_TORCH_EXPORT,
    ArchiveLimits,
    ArchiveRefused,
    InspectedArchive,
    Source,
    inspect_archive,
)
from swarm_protocol.model_loading import load_export_program, load_module, load_onnx_session
from swarm_protocol.signature import (
    DATATYPES,
    TORCH_DTYPE_TO_DATATYPE,
    Signature,
    SignatureError,
    TensorSpec,
    parse_signature,
)


class Refusal(Exception):
    """The artifact is not acceptable; the message is shown to the uploader."""


def inspected(source: Source, declared_format: str | None,
              limits: ArchiveLimits) -> InspectedArchive:
    """Return the archive once it passes inspection (before torch is even imported)."""
    try:
        return inspect_archive(source, limits, declared_format)
    except ArchiveRefused as exc:
        raise Refusal(str(exc)) from None


def load_callable(archive: InspectedArchive) -> Any:
    """Return a callable module on the CPU."""
    try:
        return load_module(archive, "cpu")
    except Exception as exc:
        raise Refusal(f"the {archive.format} archive could not be loaded: "
                      f"{_first_line(exc)}") from None


def zeros_for(specs: Signature | tuple[TensorSpec, ...], variable_dim: int = 1) -> list[Any]:
    """Return one zero tensor per input, variable dimensions set to `variable_dim`."""
    import torch

    inputs = specs.inputs if isinstance(specs, Signature) else specs
    return [torch.zeros(spec.concrete_shape(variable_dim),
                        dtype=getattr(torch, DATATYPES[spec.datatype][0]))
            for spec in inputs]


def flatten_outputs(result: Any, signature: Signature) -> list[Any]:
    """Return the outputs as a list in declared order (tensor, tuple/list or dict)."""
    import torch

    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return list(result)
    if isinstance(result, dict):
        missing = [spec.name for spec in signature.outputs if spec.name not in result]
        if missing:
            raise Refusal(f"the model's output dict lacks declared outputs: {', '.join(missing)}")
        return [result[spec.name] for spec in signature.outputs]
    raise Refusal(f"the model returned {type(result).__name__}, not tensors")


def check_outputs(outputs: list[Any], signature: Signature) -> list[dict[str, Any]]:
    """Compare outputs with the declared ones; return what was observed."""
    import torch

    if len(outputs) != len(signature.outputs):
        raise Refusal(
            f"the model returned {len(outputs)} outputs but the signature declares "
            f"{len(signature.outputs)}"
        )
    observed = []
    for spec, out in zip(signature.outputs, outputs, strict=True):
        if not isinstance(out, torch.Tensor):
            raise Refusal(f"output {spec.name!r} is {type(out).__name__}, not a tensor")
        datatype = TORCH_DTYPE_TO_DATATYPE.get(str(out.dtype).removeprefix("torch."), "?")
        shape = tuple(out.shape)
        if datatype != spec.datatype:
            raise Refusal(f"output {spec.name!r} is {datatype}, the signature says {spec.datatype}")
        if not spec.accepts_shape(shape):
            raise Refusal(
                f"output {spec.name!r} has shape {list(shape)} for a batch of 1, "
                f"the signature says {list(spec.shape)}"
            )
        observed.append({"name": spec.name, "datatype": datatype, "shape": list(shape)})
    return observed


def inspect(source: Source, declared_format: str | None, raw_signature: Any,
            limits: ArchiveLimits | None = None, example_input: Any = None) -> dict[str, Any]:
    """Return {"format", "outputs", "signature", "info"} for an acceptable artifact.

    `raw_signature` None: the file's own signature is used (and reported); raise Refusal.
    """
    declared = parse_signature(raw_signature) if raw_signature is not None else None
    archive = inspected(source, declared_format, limits or ArchiveLimits())
    if archive.format == FORMAT_HF_CAUSAL_LM:
        signature, outputs, info = _inspect_hf(archive, declared)
    elif archive.format == FORMAT_ONNX:
        signature, outputs, info = inspect_onnx_model(archive, declared)
    else:
        signature, outputs, info = inspect_torch(archive, declared, example_input)
    return {"format": archive.format, "outputs": outputs, "signature": signature.to_dict(),
            "info": {**info, "signature_inferred": declared is None}}


def _inspect_hf(archive: InspectedArchive, declared: Signature | None
                ) -> tuple[Signature, list[dict[str, Any]], dict[str, Any]]:
    from registry.inspect_hf import HfRefusal, inspect_hf_model

    try:
        return inspect_hf_model(archive, declared)
    except HfRefusal as exc:
        raise Refusal(str(exc)) from None


def inspect_torch(archive: InspectedArchive, declared: Signature | None,
                  example_input: Any) -> tuple[Signature, list[dict[str, Any]], dict[str, Any]]:
    """Return (signature, observed outputs, info) of a torch archive after one pass."""
    import torch

    torch.set_num_threads(1)
    if archive.format == FORMAT_TORCH_EXPORT:
        program = _loaded(archive, load_export_program)
        inferred = _inferred(declared, lambda: signature_infer.export_signature(program))
        module = program.module()
    else:
        module = load_callable(archive)
        inferred = None if example_input is None else _observed(module, example_input)
        if inferred is None and declared is None:
            raise Refusal("a TorchScript file does not state its signature: give a signature "
                          "or an example_input (the inputs' names, datatypes and shapes)")
    if declared is not None and inferred is not None:
        _check_declared(declared, inferred, names_matter=False)
    signature = declared or inferred
    assert signature is not None
    result = _forward(module, zeros_for(signature))
    return signature, check_outputs(flatten_outputs(result, signature), signature), {}


def _loaded(archive: InspectedArchive, loader: Any) -> Any:
    try:
        return loader(archive)
    except Exception as exc:
        raise Refusal(f"the {archive.format} archive could not be loaded: "
                      f"{_first_line(exc)}") from None


def _inferred(declared: Signature | None, infer: Any) -> Signature | None:
    """Return the file's signature; None when it cannot say but one was declared."""
    try:
        return infer()
    except (SignatureError, KeyError, AttributeError, StopIteration) as exc:
        if declared is not None:
            return None
        raise Refusal(f"the signature cannot be read from the file ({_first_line(exc)}): "
                      "give one") from None


def _check_declared(declared: Signature, inferred: Signature, *, names_matter: bool) -> None:
    try:
        signature_infer.check_declared(declared, inferred, names_matter=names_matter)
    except signature_infer.SignatureMismatch as exc:
        raise Refusal(f"the signature does not match the file: {exc}") from None


def _observed(module: Any, example_input: Any) -> Signature:
    """Return a TorchScript module's signature from passes at two sizes of the example."""
    try:
        inputs = signature_infer.parse_example_input(example_input)
    except SignatureError as exc:
        raise Refusal(str(exc)) from None
    small = _as_outputs(_forward(module, zeros_for(inputs, 1)))
    large = _as_outputs(_forward(module, zeros_for(inputs, 2)))
    try:
        return signature_infer.observed_signature(inputs, small[1], large[1], small[0])
    except SignatureError as exc:
        raise Refusal(f"the signature cannot be read from the example input: {exc}") from None


def _as_outputs(result: Any) -> tuple[list[str], list[Any]]:
    if isinstance(result, dict):
        return [str(key) for key in result], list(result.values())
    values = list(result) if isinstance(result, (tuple, list)) else [result]
    return [f"output_{i}" for i in range(len(values))], values


def _forward(module: Any, inputs: list[Any]) -> Any:
    import torch

    try:
        with torch.inference_mode():
            return module(*inputs)
    except Exception as exc:
        if "can't allocate memory" in str(exc):
            raise Refusal("the model needed more memory than the validation limit allows: "
                          f"{_first_line(exc)}") from None
        raise Refusal(f"a forward pass on zeros shaped by the signature failed: "
                      f"{_first_line(exc)}") from None


def inspect_onnx_model(archive: InspectedArchive, declared: Signature | None
                       ) -> tuple[Signature, list[dict[str, Any]], dict[str, Any]]:
    """Return (signature, observed outputs, info) of an ONNX model after one ORT run."""
    assert archive.onnx is not None
    inferred = _inferred(declared, lambda: signature_infer.onnx_signature(archive.onnx.model))
    if declared is not None and inferred is not None:
        _check_declared(declared, inferred, names_matter=True)
    signature = declared or inferred
    assert signature is not None
    session = _loaded(archive, lambda checked: load_onnx_session(checked, "cpu", 1))
    feeds = {spec.name: numpy_zeros(spec) for spec in signature.inputs}
    try:
        results = session.run([spec.name for spec in signature.outputs], feeds)
    except Exception as exc:
        raise Refusal(f"ONNX Runtime failed on zeros shaped by the signature: "
                      f"{_first_line(exc)}") from None
    info = {"opset": archive.onnx.opset, "producer": archive.onnx.producer}
    return signature, check_numpy_outputs(results, signature), info


def numpy_zeros(spec: TensorSpec) -> Any:
    """Return a zero array for one input spec, variable dimensions set to 1."""
    import numpy as np

    return np.zeros(spec.concrete_shape(1), dtype=DATATYPES[spec.datatype][0])


def check_numpy_outputs(results: list[Any], signature: Signature) -> list[dict[str, Any]]:
    """Compare ONNX Runtime's arrays with the declared outputs; return what was observed."""
    observed = []
    for spec, out in zip(signature.outputs, results, strict=True):
        datatype = TORCH_DTYPE_TO_DATATYPE.get(str(getattr(out, "dtype", "?")), "?")
        shape = tuple(getattr(out, "shape", ()))
        if datatype != spec.datatype:
            raise Refusal(f"output {spec.name!r} is {datatype}, the signature says {spec.datatype}")
        if not spec.accepts_shape(shape):
            raise Refusal(f"output {spec.name!r} has shape {list(shape)} for a batch of 1, "
                          f"the signature says {list(spec.shape)}")
        observed.append({"name": spec.name, "datatype": datatype, "shape": list(shape)})
    return observed


def checked_steps(raw_steps: Any, raw_signature: dict[str, Any],
                  observed: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the version's steps checked against the model signature, after one dry run
    on generated pictures and the model's observed output widths (swarm_protocol/steps_run.py,
    the replica's own step code)."""
    from swarm_protocol.steps import StepsError, parse_steps
    from swarm_protocol.steps_run import StepError, dry_run

    classes = {out["name"]: out["shape"][-1] for out in observed if len(out["shape"]) == 2}
    try:
        steps = parse_steps(raw_steps, parse_signature(raw_signature))
        dry_run(steps, classes)
    except (StepsError, StepError) as exc:
        raise Refusal(f"steps: {exc}") from None
    return steps.to_dict()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]


def _source(request: dict[str, Any]) -> Source:
    # The parent passes the artifact as an open descriptor: this process may run as an
    # unprivileged user who could not open the store's files by path.
    if "fd" in request:
        return os.fdopen(int(request["fd"]), "rb")
    return str(request["path"])


def main() -> int:
    request = json.loads(sys.stdin.read())
    try:
        limits = ArchiveLimits(**request.get("limits", {}))
        reply: dict[str, Any] = {"ok": True, **inspect(
            _source(request), request.get("format"), request.get("signature"), limits,
            request.get("example_input"))}
        if request.get("steps") is not None:
            reply["steps"] = checked_steps(request["steps"], reply["signature"],
                                           reply["outputs"])
    except Refusal as exc:
        reply = {"ok": False, "error": str(exc)}
    except MemoryError:
        reply = {"ok": False, "error": "the model needed more memory than the validation limit"}
    except ValueError as exc:
        reply = {"ok": False, "error": _first_line(exc)}
    sys.stdout.write("\n" + json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
