"""Live messages, defined once: the publishers build them, the consumers check and send them.

Each message is a dataclass with a `type` field (what the browser switches on) and the page
groups it goes to. `to_dict` is the JSON the browser receives; `message_from_dict` rebuilds
and checks a message on the receiving side (the outbox and the channel layer carry dicts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

OVERVIEW = "dash.overview"
FLEET = "dash.fleet"
DEPLOYMENTS = "dash.deployments"
PAGE_GROUPS = (OVERVIEW, FLEET, DEPLOYMENTS)


class MessageError(ValueError):
    """A payload that is not one of our messages."""


@dataclass
class LiveMessage:
    """Base of every live message."""

    groups: ClassVar[tuple[str, ...]] = ()
    # False: worthless once late (the next heartbeat replaces it), so never put in the outbox.
    durable: ClassVar[bool] = True
    type: str = field(default="", init=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class NodeFiguresMessage(LiveMessage):
    """A heartbeat's figures: per device and per replica (counters since replica start)."""

    groups: ClassVar[tuple[str, ...]] = (OVERVIEW, FLEET, DEPLOYMENTS)
    durable: ClassVar[bool] = False
    node_id: int
    at_s: float
    devices: list[dict[str, Any]]
    replicas: list[dict[str, Any]]
    type: str = field(default="node.figures", init=False)


@dataclass
class NodeStatusMessage(LiveMessage):
    """A node joined, went offline, came back, is draining or was removed."""

    groups: ClassVar[tuple[str, ...]] = (OVERVIEW, FLEET)
    node_id: int
    name: str
    status: str
    at: str
    type: str = field(default="node.status", init=False)


@dataclass
class ReplicasChangedMessage(LiveMessage):
    """A deployment's replicas after a change (a snapshot: the page replaces what it shows)."""

    groups: ClassVar[tuple[str, ...]] = (OVERVIEW, FLEET, DEPLOYMENTS)
    deployment_id: int
    deployment_name: str
    desired_replicas: int
    replicas: list[dict[str, Any]]
    at: str
    type: str = field(default="replicas.changed", init=False)


@dataclass
class ScalingEventMessage(LiveMessage):
    """The auto-scaler (or a person) changed a deployment's replica count, and why."""

    groups: ClassVar[tuple[str, ...]] = (OVERVIEW, DEPLOYMENTS)
    deployment_id: int
    deployment_name: str
    at: str
    from_replicas: int
    to_replicas: int
    reason: str
    type: str = field(default="scaling.event", init=False)


MESSAGE_TYPES: dict[str, type[LiveMessage]] = {
    cls.type: cls for cls in (NodeFiguresMessage, NodeStatusMessage, ReplicasChangedMessage,
                              ScalingEventMessage)
}


def message_from_dict(raw: Any) -> LiveMessage:
    """Rebuild a message from its dict; raise MessageError naming what is wrong."""
    if not isinstance(raw, dict):
        raise MessageError("a live message must be a JSON object")
    cls = MESSAGE_TYPES.get(raw.get("type", ""))
    if cls is None:
        raise MessageError(f"unknown live message type {raw.get('type')!r}")
    names = [spec.name for spec in fields(cls) if spec.init]
    missing = [name for name in names if name not in raw]
    if missing:
        raise MessageError(f"{cls.type}: {missing[0]} is required")
    return cls(**{name: raw[name] for name in names})
