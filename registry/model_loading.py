"""Load a model from an archive that passed `registry.archive.inspect_archive`, and only then.

Shared by the validation child and the replica (no Django; torch imported when called).
"""

from __future__ import annotations

import os
from typing import Any

from registry.archive import FORMAT_TORCHSCRIPT, InspectedArchive, require_inspected

# torch.load reads this at every call and then refuses weights_only=False: torch.export's
# own fallbacks (sample inputs, legacy state dicts) would otherwise unpickle freely.
FORCE_WEIGHTS_ONLY_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def load_module(archive: InspectedArchive, device: str = "cpu") -> Any:
    """Return the archive's callable module on `device` (in eval mode)."""
    archive = require_inspected(archive)
    os.environ[FORCE_WEIGHTS_ONLY_ENV] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    import torch

    source = archive.source
    if not isinstance(source, str):
        source.seek(0)
    if archive.format == FORMAT_TORCHSCRIPT:
        module = torch.jit.load(source, map_location=device)  # type: ignore[no-untyped-call]
        module.eval()
        return module
    return torch.export.load(source).module().to(device)
