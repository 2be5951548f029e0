"""The small interface every GPU-server provider offers the auto-scaler.

The node plan (scaling/nodeplan.py) decides how many servers to add and which to
release; a provider only carries that out. A cloud or Kubernetes provider is one more
class with these members, registered in `scaling.providers.get_provider`.
"""

from __future__ import annotations

from typing import Protocol

from scaling.nodeplan import NodeBounds


class ProviderError(RuntimeError):
    """A provider could not do what it was asked (no admin to own a token, no ports...)."""


class NodeProvider(Protocol):
    """Starts and stops GPU servers; each one joins the portal as a node of that name."""

    name: str
    bounds: NodeBounds

    def managed_names(self) -> set[str]:
        """Return the names of the servers it runs now (alive, not being stopped)."""
        ...

    def start_nodes(self, count: int, *, counted: int | None = None) -> list[str]:
        """Start up to `count` servers; return the names of those started. `counted`: how
        many the caller saw running when it decided (those started since count toward
        `count`)."""
        ...

    def stop_node(self, name: str) -> bool:
        """Ask one server to drain and leave; return whether it was running."""
        ...

    def stop_all(self, timeout_s: float) -> None:
        """Stop every server it runs, waiting up to `timeout_s`, then force the rest."""
        ...
