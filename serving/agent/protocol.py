"""Message shapes between the worker agent and the portal, defined once.

Plain dataclasses and stdlib only: the agent (no Django) builds and parses these,
and the portal's serializers validate against the same fields via `from_dict`.
Every `from_dict` raises ProtocolError with a message naming the bad field.

Authentication:
- agent -> portal: `Authorization: Bearer <node_secret>`; the secret has the form
  `swn_<node_id>_<random>` and the portal stores only its hash.
- portal/gateway -> replica: `Authorization: Bearer <replica_key>`; the portal derives
  the key from the node id (HMAC under SECRET_KEY), stores it nowhere, and hands it to
  the agent in RegisterResponse and HeartbeatResponse; the agent passes it to its
  replica processes in the SWARM_REPLICA_KEY environment variable.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

PROTOCOL_VERSION = 1
REGISTER_PATH = "/api/agent/register"
HEARTBEAT_PATH = "/api/agent/heartbeat"
DEREGISTER_PATH = "/api/agent/deregister"
# Artifacts: GET {portal}/api/agent/artifacts/{sha256} with the node secret; the reply
# carries X-Artifact-SHA256 and Content-Length.
ARTIFACT_PATH = "/api/agent/artifacts/{sha256}"
NODE_SECRET_PREFIX = "swn_"  # noqa: S105 - a prefix, not a secret

REPLICA_STATES = ("starting", "ready", "draining", "failed", "stopped")
DEVICE_KINDS = ("gpu", "cpu")


class ProtocolError(ValueError):
    """A message that does not have the agreed shape."""


T = TypeVar("T", bound="Message")


def _check_type(name: str, value: Any, kind: Any, optional: bool) -> None:
    if value is None and optional:
        return
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if kind is int and isinstance(value, bool):
        raise ProtocolError(f"{name} must be an integer")
    if not isinstance(value, kind):
        raise ProtocolError(f"{name} must be {getattr(kind, '__name__', kind)}")


@dataclass
class Message:
    """Base: to_dict for sending, from_dict (strict) for receiving."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[T], raw: Any, where: str = "") -> T:
        if not isinstance(raw, dict):
            raise ProtocolError(f"{where or cls.__name__} must be a JSON object")
        values: dict[str, Any] = {}
        for spec in fields(cls):
            name = f"{where}{spec.name}"
            kind, optional, nested = _field_types(cls)[spec.name]
            if spec.name not in raw:
                if _has_default(spec):
                    continue
                raise ProtocolError(f"{name} is required")
            values[spec.name] = _convert(name, raw[spec.name], kind, optional, nested)
        return cls(**values)


@functools.cache
def _field_types(cls: type) -> dict[str, tuple[Any, bool, Any]]:
    """Return {field: (python type, optional, nested Message class)} from the annotations."""
    result = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = type(None) in typing.get_args(hint)
        origin = typing.get_origin(hint)
        if origin is list and args and isinstance(args[0], type) and issubclass(args[0], Message):
            result[name] = (list, False, args[0])
        elif origin in (list, dict):
            result[name] = (origin, optional, None)
        else:
            result[name] = (args[0] if optional else hint, optional, None)
    return result


def _has_default(spec: Any) -> bool:
    from dataclasses import MISSING

    return spec.default is not MISSING or spec.default_factory is not MISSING


def _convert(name: str, value: Any, kind: Any, optional: bool, nested: Any) -> Any:
    if nested is not None:
        if not isinstance(value, list):
            raise ProtocolError(f"{name} must be a list")
        return [nested.from_dict(item, f"{name}[{i}].") for i, item in enumerate(value)]
    _check_type(name, value, kind, optional)
    return float(value) if kind is float and value is not None else value


@dataclass
class DeviceInfo(Message):
    """One device: a GPU read through NVML, or the CPU on a machine without one."""

    index: int
    kind: str
    name: str
    uuid: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_pct: float
    temperature_c: float | None = None
    power_w: float | None = None


@dataclass
class RegisterRequest(Message):
    join_token: str
    name: str
    address: str
    cost_per_hour: float
    devices: list[DeviceInfo]
    labels: dict[str, Any] = field(default_factory=dict)
    agent_version: str = ""
    protocol_version: int = PROTOCOL_VERSION


@dataclass
class RegisterResponse(Message):
    node_id: int
    node_secret: str
    replica_key: str
    heartbeat_interval_s: float


@dataclass
class ReplicaStatus(Message):
    """What the agent knows of one replica process, sent in every heartbeat."""

    replica_id: int
    state: str
    port: int | None = None
    error: str = ""
    in_flight: int = 0  # at the moment of the heartbeat, queued requests included
    queue_depth: int = 0  # of those, waiting for a batch
    mean_in_flight: float | None = None  # averaged since the previous heartbeat
    completed: int = 0
    failed: int = 0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None


@dataclass
class HeartbeatRequest(Message):
    devices: list[DeviceInfo]
    replicas: list[ReplicaStatus]
    cached_artifacts: list[str] = field(default_factory=list)


@dataclass
class DesiredReplica(Message):
    """A replica the portal wants on this node, with all the agent needs to start it."""

    replica_id: int
    model_name: str
    version: int
    sha256: str
    size_bytes: int
    format: str
    signature: dict[str, Any]
    max_batch_size: int
    max_queue_delay_ms: float
    device: str
    threads: int = 1


@dataclass
class HeartbeatResponse(Message):
    desired: list[DesiredReplica]
    replica_key: str
    heartbeat_interval_s: float
    node_status: str = "ready"
