"""Load an uploaded artifact in a throw-away process and check it against its signature.

Run as `python -m registry.inspect_child`, with a JSON request on stdin and one JSON
line on stdout. The portal never loads user files itself: this process does, under a
time and memory limit that the parent enforces. No Django here.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from registry.archive import (
    ArchiveLimits,
    ArchiveRefused,
    InspectedArchive,
    Source,
    inspect_archive,
)
from registry.model_loading import load_module
from registry.signature import DATATYPES, TORCH_DTYPE_TO_DATATYPE, Signature, parse_signature


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


def zeros_for(signature: Signature) -> list[Any]:
    """Return one zero tensor per input, variable dimensions set to 1."""
    import torch

    return [
        torch.zeros(spec.concrete_shape(1), dtype=getattr(torch, DATATYPES[spec.datatype][0]))
        for spec in signature.inputs
    ]


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
            limits: ArchiveLimits | None = None) -> dict[str, Any]:
    """Return {"format", "outputs"} for an acceptable artifact, or raise Refusal."""
    signature = parse_signature(raw_signature)
    archive = inspected(source, declared_format, limits or ArchiveLimits())
    import torch

    torch.set_num_threads(1)
    module = load_callable(archive)
    try:
        with torch.inference_mode():
            result = module(*zeros_for(signature))
    except Exception as exc:
        if "can't allocate memory" in str(exc):
            raise Refusal("the model needed more memory than the validation limit allows: "
                          f"{_first_line(exc)}") from None
        raise Refusal(f"a forward pass on zeros shaped by the signature failed: "
                      f"{_first_line(exc)}") from None
    outputs = check_outputs(flatten_outputs(result, signature), signature)
    return {"format": archive.format, "outputs": outputs}


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
            _source(request), request.get("format"), request["signature"], limits
        )}
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
