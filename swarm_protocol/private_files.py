"""Files only this user may read (node secrets, keys, the gateway's saved table).

Shared by the worker (credentials, TLS key and certificate) and the gateway (its table
cache, which holds replica keys). No Django; Python 3.10+.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` atomically with `data`, mode 0600 from the first byte.

    The temporary file is unique per call (mkstemp: O_EXCL, 0600) in the same folder, so
    two writers at once (threads or processes) never rename each other's file away, and a
    reader sees the old content or the new, never a part. Raises OSError (the folder must
    exist); the temporary file is removed on any failure.
    """
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                        dir=path.parent)
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
