"""Load a model from an archive that passed `swarm_protocol.archive.inspect_archive`, and only then.

Shared by the validation child and the replica (no Django; torch and onnxruntime imported
when called). The only module that calls a torch loader, builds an ONNX Runtime session or
loads a Hugging Face model (`from_pretrained`).
"""

from __future__ import annotations

import os
from typing import Any

from swarm_protocol.archive import (
    FORMAT_HF_CAUSAL_LM,
    FORMAT_ONNX,
    FORMAT_TORCHSCRIPT,
    InspectedArchive,
    require_inspected,
)

# torch.load reads this at every call and then refuses weights_only=False: torch.export's
# own fallbacks (sample inputs, legacy state dicts) would otherwise unpickle freely.
FORCE_WEIGHTS_ONLY_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def _force_weights_only() -> None:
    os.environ[FORCE_WEIGHTS_ONLY_ENV] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)


def _rewound(archive: InspectedArchive) -> Any:
    source = archive.source
    if not isinstance(source, str):
        source.seek(0)
    return source


def load_module(archive: InspectedArchive, device: str = "cpu") -> Any:
    """Return the archive's callable torch module on `device` (in eval mode)."""
    archive = require_inspected(archive)
    if archive.format == FORMAT_ONNX:
        raise TypeError("an ONNX model loads with load_onnx_session, not as a torch module")
    if archive.format == FORMAT_TORCHSCRIPT:
        import torch

        _force_weights_only()
        module = torch.jit.load(_rewound(archive), map_location=device)  # type: ignore[no-untyped-call]
        module.eval()
        return module
    return load_export_program(archive).module().to(device)


def load_export_program(archive: InspectedArchive) -> Any:
    """Return the torch.export ExportedProgram (its example shapes give a signature)."""
    archive = require_inspected(archive)
    if archive.format != "torch_export":
        raise TypeError(f"a {archive.format} archive is not a torch.export program")
    _force_weights_only()
    import torch

    return torch.export.load(_rewound(archive))


def onnx_providers(device: str, available: list[str]) -> list[Any]:
    """Return ONNX Runtime providers: CUDA (on device N) when asked for and built in, CPU."""
    if device.startswith("cuda") and CUDA_PROVIDER in available:
        device_id = int(device.partition(":")[2] or 0)
        return [(CUDA_PROVIDER, {"device_id": device_id}), CPU_PROVIDER]
    return [CPU_PROVIDER]  # never the Azure provider (it calls out over the network)


def load_onnx_session(archive: InspectedArchive, device: str = "cpu", threads: int = 1) -> Any:
    """Return an onnxruntime.InferenceSession over the checked bytes (no custom-op library)."""
    archive = require_inspected(archive)
    if archive.format != FORMAT_ONNX or archive.onnx is None:
        raise TypeError(f"a {archive.format} archive is not an ONNX model")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: warnings about providers are routine
    providers = onnx_providers(device, onnxruntime.get_available_providers())
    # From the bytes the inspector checked, not the path: nothing is read twice, and a
    # model in memory has no folder next to it to resolve external data against.
    return onnxruntime.InferenceSession(archive.onnx.content, sess_options=options,
                                        providers=providers)


def load_causal_lm(archive: InspectedArchive, device: str = "cpu") -> tuple[Any, Any]:
    """Return (model in eval mode on `device`, tokenizer) of a checked hf_causal_lm archive.

    Only the members the inspector checked are copied out, by name, into a private
    temporary folder (no extractall: nothing else of the archive is written), and loaded
    from there with safetensors only, no remote code and no hub access.
    """
    import tempfile

    archive = require_inspected(archive)
    if archive.format != FORMAT_HF_CAUSAL_LM or archive.hf is None:
        raise TypeError(f"a {archive.format} archive is not a Hugging Face causal LM")
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach a hub, whatever a config names
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory(prefix="swarm-hf-") as folder:
        _copy_checked_members(archive, folder)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False,
                                                  local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, use_safetensors=True, trust_remote_code=False, local_files_only=True)
    return model.to(device).eval(), tokenizer  # type: ignore[arg-type]


def _copy_checked_members(archive: InspectedArchive, folder: str) -> None:
    from swarm_protocol.archive_hf import iter_member_bytes

    assert archive.hf is not None
    for name, chunks in iter_member_bytes(_rewound(archive), archive.hf):
        written = 0
        with open(os.path.join(folder, name), "xb") as handle:  # names were checked: no '/'
            for chunk in chunks:
                written += len(chunk)
                if written > archive.hf.sizes[name]:
                    raise ValueError(f"{name} holds more bytes than its header declares")
                handle.write(chunk)
