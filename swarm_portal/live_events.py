"""Live events: what the services changed, for whoever shows it live (the dashboards).

serving/ and scaling/ call `publish(event)`; the dashboards app subscribes in its
AppConfig.ready(). So the services name no consumer and the dashboards can go without them
breaking: with no subscriber an event goes nowhere. A subscriber must return at once (send
after commit) and a failing one is logged, never raised to the publishing service.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeFigures:
    """A heartbeat's figures: per-device and per-replica rows (JSON-able), at `at_s` (epoch)."""

    node_id: int
    at_s: float
    devices: list[dict[str, Any]]
    replicas: list[dict[str, Any]]


@dataclass(frozen=True)
class NodeStatusChanged:
    """A node's status changed; status None: read it after commit ("removed": it is gone)."""

    node_id: int
    status: str | None = None
    name: str = ""


@dataclass(frozen=True)
class ReplicasChanged:
    """Replicas of these deployments changed (started, stopped, moved, failed)."""

    deployment_ids: tuple[int, ...]


@dataclass(frozen=True)
class DeploymentScaled:
    """The auto-scaler decided a deployment's replicas; `at` is ISO 8601."""

    deployment_id: int
    deployment_name: str
    at: str
    from_replicas: int
    to_replicas: int
    reason: str


LiveEvent = NodeFigures | NodeStatusChanged | ReplicasChanged | DeploymentScaled
Subscriber = Callable[[LiveEvent], None]

_subscribers: list[Subscriber] = []


def subscribe(subscriber: Subscriber) -> None:
    """Deliver every later event to `subscriber` (once, however often it subscribes)."""
    if subscriber not in _subscribers:
        _subscribers.append(subscriber)


def unsubscribe(subscriber: Subscriber) -> None:
    """Stop delivering to `subscriber` (no error when it was not subscribed)."""
    if subscriber in _subscribers:
        _subscribers.remove(subscriber)


def publish(event: LiveEvent) -> None:
    """Hand the event to every subscriber; never raises (a live view must not fail a write)."""
    for subscriber in list(_subscribers):
        try:
            subscriber(event)
        except Exception:
            log.exception("live event subscriber %r failed on %r", subscriber, event)
