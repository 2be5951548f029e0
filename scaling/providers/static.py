"""The static provider: GPU servers joined by hand with a join token.

It starts and stops nothing. The auto-scaler still activates and idles these nodes by
placing replicas on them or not (an idle node costs nothing); a plan that wants more
nodes is reported as unmet, for an operator to join more servers.
"""

from __future__ import annotations

from scaling.nodeplan import UNBOUNDED, NodeBounds


class StaticProvider:
    """Nodes that joined with tokens: nothing to add or remove."""

    name = "static"

    def __init__(self, idle_release_s: float = 60.0) -> None:
        # Unbounded so that the plan still says how many servers the pending replicas need.
        self.bounds = NodeBounds(min_nodes=0, max_nodes=UNBOUNDED,
                                 idle_release_s=idle_release_s)

    def managed_names(self) -> set[str]:
        """Return no names: no node here was started by the portal."""
        return set()

    def start_nodes(self, count: int, *, counted: int | None = None) -> list[str]:
        """Return []: servers join by hand."""
        return []

    def stop_node(self, name: str) -> bool:
        """Return False: a node joined by hand is never stopped from here."""
        return False

    def stop_all(self, timeout_s: float) -> None:
        """Do nothing: the servers are not ours to stop."""
