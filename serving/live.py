"""The latest heartbeat figures per node and replica, kept in the cache, not the database."""

from __future__ import annotations

import time
from typing import Any

from django.core.cache import cache
from django.db import transaction

FIGURES_TTL_S = 300


def _node_key(node_id: int) -> str:
    return f"node:{node_id}:live"


def record_heartbeat(node_id: int, at_s: float, devices: list[dict[str, Any]],
                     replicas: list[dict[str, Any]]) -> None:
    """Store a heartbeat's figures (overwritten by the next one)."""
    cache.set(_node_key(node_id), {"at_s": at_s, "devices": devices, "replicas": replicas},
              FIGURES_TTL_S)


def node_figures(node_id: int) -> dict[str, Any] | None:
    """Return the last heartbeat's figures of a node, or None."""
    return cache.get(_node_key(node_id))


def nodes_figures(node_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Return the last figures of many nodes in one cache round trip."""
    found = cache.get_many([_node_key(node_id) for node_id in node_ids])
    return {int(key.split(":")[1]): value for key, value in found.items()}


def last_heartbeat_s(node_id: int) -> float | None:
    figures = node_figures(node_id)
    return figures["at_s"] if figures else None


def forget(node_id: int) -> None:
    cache.delete(_node_key(node_id))


ROUTES_REVISION_KEY = "routes:revision"


def bump_routes() -> None:
    """Tell every gateway (any process) that its routing table is stale."""
    cache.set(ROUTES_REVISION_KEY, time.time_ns(), None)


def bump_routes_on_commit() -> None:
    """Bump once the current transaction commits (the new rows are visible by then)."""
    transaction.on_commit(bump_routes)


def routes_revision() -> str:
    return str(cache.get(ROUTES_REVISION_KEY, 0))
