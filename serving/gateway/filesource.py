"""A TableSource that reads the routing table from a JSON file (standalone runs, tests)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from serving.gateway.routes import RouteTable
from swarm_protocol.private_files import write_private


class FileTableSource:
    """Reads `RouteTable.to_dict()` JSON; the file's identity and mtime are the revision.

    Writers should replace the file atomically (write a temporary file, then rename it):
    a half-written file fails to parse, and the gateway keeps the old table until the
    next poll.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    async def revision(self) -> str:
        """Return a token that changes when the file is replaced or rewritten."""
        stat = os.stat(self.path)  # microseconds: not worth a thread
        return f"{stat.st_ino}:{stat.st_mtime_ns}:{stat.st_size}"

    async def load(self) -> RouteTable:
        """Return the table in the file."""
        return RouteTable.from_dict(json.loads(self.path.read_bytes()))


def write_table(path: Path | str, table: RouteTable) -> None:
    """Write a table atomically where a FileTableSource reads it."""
    write_private(Path(path), json.dumps(table.to_dict()).encode())  # it holds replica keys
