"""A marker that `make run` is shutting down: replicas of leaving nodes are not re-placed.

When the launcher stops, its local workers drain and deregister while the portal still
answers; the portal would otherwise place their replicas on any other node (an external
worker), which then outlives the portal serving them. The launcher writes the marker
before it stops anything and removes it when it starts; the portal's node services read
it with `is_stopping`. A file, because the launcher and the portal are separate processes
sharing only SWARM_VAR_DIR. No Django here.
"""

from __future__ import annotations

from pathlib import Path

MARKER_NAME = "portal-stopping"


def mark_stopping(var_dir: Path) -> None:
    """Record that the embedded default is shutting down."""
    Path(var_dir).mkdir(parents=True, exist_ok=True)
    (Path(var_dir) / MARKER_NAME).touch()


def clear_stopping(var_dir: Path) -> None:
    """Forget an earlier shutdown (the launcher starts)."""
    (Path(var_dir) / MARKER_NAME).unlink(missing_ok=True)


def is_stopping(var_dir: Path) -> bool:
    """Return whether the embedded default is shutting down."""
    return (Path(var_dir) / MARKER_NAME).exists()
