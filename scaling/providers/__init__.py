"""GPU-server providers: where the auto-scaler gets nodes from, and gives them back.

`get_provider()` builds the one named by `SCALING_PROVIDER`: `static` (nodes joined
with tokens) or `local` (`swarm-worker` processes on this machine).
"""

from __future__ import annotations

from scaling.providers.base import NodeProvider, ProviderError
from scaling.providers.local import LocalProcessProvider
from scaling.providers.static import StaticProvider

PROVIDERS = ("static", "local")


def get_provider() -> NodeProvider:
    """Return the provider the settings name."""
    from django.conf import settings  # lazily: the launcher imports this without Django

    if settings.SCALING_PROVIDER == "local":
        return LocalProcessProvider(
            settings.VAR_DIR, settings.LOCAL_FLEET_PORTAL_URL,
            min_nodes=settings.LOCAL_FLEET_MIN_NODES, max_nodes=settings.LOCAL_FLEET_MAX_NODES,
            idle_release_s=settings.NODE_IDLE_RELEASE_S, base_port=settings.LOCAL_FLEET_BASE_PORT)
    return StaticProvider(idle_release_s=settings.NODE_IDLE_RELEASE_S)


__all__ = ["PROVIDERS", "LocalProcessProvider", "NodeProvider", "ProviderError",
           "StaticProvider", "get_provider"]
