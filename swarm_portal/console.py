"""What `make run` shows on its console: the URL, the admin password once, and errors.

Everything else (uvicorn's and Celery's start-up lines, Celery's banner, every INFO line,
the demo's registration) goes to files under `SWARM_VAR_DIR/logs/`, one per child. The
launcher follows those files (`ErrorEcho.poll`, from its supervision loop: no threads, so
the children can still be started with a pre-exec function) and prints the lines that
report an error, each with where to read the rest. No Django here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ERROR_LINE = re.compile(rb"\b(ERROR|CRITICAL)\b|^Traceback \(most recent call last\)")
MAX_READ_BYTES = 1024 * 1024  # per file and poll: a flood is skipped, not echoed
MAX_ECHOED_CHARS = 300


def log_dir(var_dir: Path) -> Path:
    """Return (and make) the folder of the children's log files."""
    path = var_dir / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def configure_launcher_logging(var_dir: Path) -> Path:
    """Send the launcher's own INFO lines to logs/launcher.log, WARNING and up also to the
    console; return the file's path."""
    path = log_dir(var_dir) / "launcher.log"
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_console = logging.StreamHandler()
    to_console.setLevel(logging.WARNING)
    to_console.setFormatter(logging.Formatter("launcher: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[to_file, to_console], force=True)
    return path


@dataclass
class _Followed:
    path: Path
    offset: int = 0
    partial: bytes = b""


@dataclass
class ErrorEcho:
    """Follows log files from their current end; returns the new lines that report errors."""

    paths: Mapping[str, Path]
    _followed: dict[str, _Followed] = field(init=False)

    def __post_init__(self) -> None:
        self._followed = {name: _Followed(path, _size(path)) for name, path in self.paths.items()}

    def poll(self) -> list[str]:
        """Return `name: line (more in PATH)` for each new error line since the last poll."""
        echoed: list[str] = []
        for name, followed in self._followed.items():
            for line in _new_lines(followed):
                if ERROR_LINE.search(line):
                    text = line.decode(errors="replace").strip()[:MAX_ECHOED_CHARS]
                    echoed.append(f"{name}: {text}  (more in {followed.path})")
        return echoed


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _new_lines(followed: _Followed) -> list[bytes]:
    size = _size(followed.path)
    if size < followed.offset:  # truncated or replaced: start again from its beginning
        followed.offset, followed.partial = 0, b""
    if size == followed.offset:
        return []
    if size - followed.offset > MAX_READ_BYTES:  # a flood: skip to near the end
        followed.offset, followed.partial = size - MAX_READ_BYTES, b""
    with followed.path.open("rb") as file:
        file.seek(followed.offset)
        data = file.read(size - followed.offset)
    followed.offset += len(data)
    *lines, followed.partial = (followed.partial + data).split(b"\n")
    return lines
