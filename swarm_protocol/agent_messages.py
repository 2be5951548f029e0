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
import math
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

# Bounds every field gets unless its metadata says otherwise: a value the database or the
# cache cannot hold must be refused here (400), not fail later as a 500.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1  # Django's PositiveIntegerField
MAX_TEXT_CHARS = 65_536  # error texts may be tracebacks; the portal truncates them
MAX_LIST_ITEMS = 10_000
MAX_JSON_DEPTH = 32  # inside free-form objects (labels, signature)
MAX_LOG_LINES = 200  # per replica per heartbeat (serving/agent/logs.py sends no more)
MAX_LOG_LINE_CHARS = 1024


def limits(*, minimum: float | None = None, maximum: float | None = None,
           max_chars: int | None = None, max_items: int | None = None,
           item_max_chars: int | None = None) -> dict[str, float | None]:
    """Return field metadata with bounds tighter than the defaults (those of a DB column)."""
    return {"minimum": minimum, "maximum": maximum, "max_chars": max_chars,
            "max_items": max_items, "item_max_chars": item_max_chars}


@dataclass(frozen=True)
class _Spec:
    """What from_dict checks for one field: its type, bounds and nested message class."""

    kind: Any
    optional: bool = False
    nested: Any = None  # a Message class: the field is a list of these
    item: Any = None  # element type of a list of plain values
    minimum: float = INT64_MIN  # a float field without bounds of its own: -inf .. inf
    maximum: float = INT64_MAX
    max_chars: int = MAX_TEXT_CHARS
    max_items: int = MAX_LIST_ITEMS
    item_max_chars: int = MAX_TEXT_CHARS


_FREE_FLOAT = _Spec(float, minimum=-math.inf, maximum=math.inf)  # inside free-form objects


def _check_int(name: str, value: Any, spec: _Spec) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{name} must be an integer")
    if not spec.minimum <= value <= spec.maximum:
        raise ProtocolError(f"{name} must be between {spec.minimum} and {spec.maximum}")
    return value


def _check_float(name: str, value: Any, spec: _Spec) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"{name} must be a number")
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        raise ProtocolError(f"{name} is out of range")
    number = float(value)
    if not math.isfinite(number):  # Python's json accepts NaN and Infinity
        raise ProtocolError(f"{name} must be a finite number")
    if not spec.minimum <= number <= spec.maximum:
        raise ProtocolError(f"{name} must be between {spec.minimum:g} and {spec.maximum:g}")
    return number


def _check_str(name: str, value: Any, max_chars: int) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{name} must be a string")
    if len(value) > max_chars:
        raise ProtocolError(f"{name} is longer than {max_chars} characters")
    if "\x00" in value or not _is_utf8(value):  # neither fits a database text column
        raise ProtocolError(f"{name} must be text without NUL or unpaired surrogates")
    return value


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _check_json(name: str, value: Any, depth: int = 0) -> None:
    """Check a free-form JSON value: bounded depth, finite numbers, clean strings."""
    if depth > MAX_JSON_DEPTH:
        raise ProtocolError(f"{name} is nested too deeply")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_str(f"{name} key", key, MAX_TEXT_CHARS)
            _check_json(f"{name}.{key}"[:200], item, depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(f"{name}[{index}]", item, depth + 1)
    elif isinstance(value, str):
        _check_str(name, value, MAX_TEXT_CHARS)
    elif isinstance(value, float):
        _check_float(name, value, _FREE_FLOAT)
    elif isinstance(value, int) and not isinstance(value, bool):
        _check_int(name, value, _Spec(int))


def _check_value(name: str, value: Any, kind: Any, spec: _Spec, max_chars: int) -> Any:
    if kind is int:
        return _check_int(name, value, spec)
    if kind is float:
        return _check_float(name, value, spec)
    if kind is str:
        return _check_str(name, value, max_chars)
    if kind is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"{name} must be true or false")
        return value
    if kind is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{name} must be a JSON object")
        _check_json(name, value)
        return value
    if kind is Any:
        _check_json(name, value)
        return value
    raise ProtocolError(f"{name} has an unsupported type")  # a field we forgot to describe


def _convert(name: str, value: Any, spec: _Spec) -> Any:
    if value is None and spec.optional:
        return None
    if spec.kind is not list:
        return _check_value(name, value, spec.kind, spec, spec.max_chars)
    if not isinstance(value, list):
        raise ProtocolError(f"{name} must be a list")
    if len(value) > spec.max_items:
        raise ProtocolError(f"{name} has more than {spec.max_items} items")
    if spec.nested is not None:
        return [spec.nested.from_dict(item, f"{name}[{i}].") for i, item in enumerate(value)]
    item_spec = _Spec(spec.item)
    return [_check_value(f"{name}[{i}]", item, spec.item, item_spec, spec.item_max_chars)
            for i, item in enumerate(value)]


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
        # A dataclass with eq is unhashable, its class is not: mypy needs the plain `type`.
        specs = _field_specs(typing.cast(type, cls))
        for spec in fields(cls):
            name = f"{where}{spec.name}"
            if spec.name not in raw:
                if _has_default(spec):
                    continue
                raise ProtocolError(f"{name} is required")
            values[spec.name] = _convert(name, raw[spec.name], specs[spec.name])
        return cls(**values)


@functools.cache
def _field_specs(cls: type) -> dict[str, _Spec]:
    """Return each field's checks, from its annotation and its `limits` metadata."""
    hints = typing.get_type_hints(cls)
    result = {}
    for spec in fields(cls):
        hint = hints[spec.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = type(None) in typing.get_args(hint)
        origin = typing.get_origin(hint)
        bounds = {k: v for k, v in spec.metadata.items() if v is not None}
        if origin is list:
            item = args[0] if args else Any
            is_message = isinstance(item, type) and issubclass(item, Message)
            result[spec.name] = _Spec(list, optional, item if is_message else None,
                                      None if is_message else item, **bounds)
        elif origin is dict:
            result[spec.name] = _Spec(dict, optional, **bounds)
        else:
            kind = args[0] if optional else hint
            if kind is float:  # finite is checked anyway; a range only where one is given
                bounds = {"minimum": -math.inf, "maximum": math.inf, **bounds}
            result[spec.name] = _Spec(kind, optional, **bounds)
    return result


def field_accepts(cls: type[Message], name: str, value: Any) -> bool:
    """Return whether `cls.from_dict` takes `value` for its field `name`.

    For the sender: a figure it cannot vouch for is left out rather than sent and
    refused (one bad figure would cost the whole message a 400).
    """
    try:
        _convert(name, value, _field_specs(typing.cast(type, cls))[name])
    except ProtocolError:
        return False
    return True


def _has_default(spec: Any) -> bool:
    from dataclasses import MISSING

    return spec.default is not MISSING or spec.default_factory is not MISSING


MAX_DEVICE_PROCESSES = 64  # per GPU: more than any real card runs; the rest are dropped


@dataclass
class DeviceProcess(Message):
    """A process holding memory on a GPU, as NVML reports it."""

    pid: int = field(metadata=limits(minimum=0, maximum=INT32_MAX))
    # None: NVML cannot say (no permission, or a MIG / container setup hiding it).
    memory_used_bytes: int | None = field(default=None, metadata=limits(minimum=0))
    # The agent's replica this process belongs to (None: not one of ours).
    replica_id: int | None = field(default=None, metadata=limits(minimum=1))


@dataclass
class DeviceInfo(Message):
    """One device: a GPU read through NVML, or the CPU on a machine without one."""

    # Bounds of the Gpu row each device becomes (serving.models.Gpu).
    index: int = field(metadata=limits(minimum=0, maximum=INT32_MAX))
    kind: str = field(metadata=limits(max_chars=8))
    name: str = field(metadata=limits(max_chars=200))
    uuid: str = field(metadata=limits(max_chars=100))
    memory_total_bytes: int = field(metadata=limits(minimum=0))
    memory_used_bytes: int = field(metadata=limits(minimum=0))
    utilization_pct: float
    temperature_c: float | None = None
    power_w: float | None = None
    processes: list[DeviceProcess] = field(
        default_factory=list, metadata=limits(max_items=MAX_DEVICE_PROCESSES))


@dataclass
class RegisterRequest(Message):
    join_token: str = field(metadata=limits(max_chars=200))
    name: str = field(metadata=limits(max_chars=100))
    address: str = field(metadata=limits(max_chars=255))
    cost_per_hour: float
    devices: list[DeviceInfo] = field(metadata=limits(max_items=256))
    labels: dict[str, Any] = field(default_factory=dict)
    agent_version: str = field(default="", metadata=limits(max_chars=50))
    protocol_version: int = PROTOCOL_VERSION
    # PEM certificate signing request for the node's own key (made on the node, never sent):
    # the portal's CA signs a certificate for `address`. "": plain HTTP, loopback nodes only.
    csr_pem: str = field(default="", metadata=limits(max_chars=8192))
    # Reachability (serving/services/reachability.py): while it joins, the agent answers
    # connections on probe_port with probe_nonce; `tunnel` asks for tunnel mode outright.
    tunnel: bool = False
    probe_port: int | None = field(default=None, metadata=limits(minimum=1, maximum=65_535))
    probe_nonce: str = field(default="", metadata=limits(max_chars=64))


@dataclass
class RegisterResponse(Message):
    node_id: int
    node_secret: str
    replica_key: str
    heartbeat_interval_s: float
    # The node's certificate and the CA that signed it (PEM); "" when no CSR was sent.
    certificate_pem: str = ""
    ca_certificate_pem: str = ""
    reach_mode: str = "direct"  # or "tunnel": the agent serves through gateway tunnels


@dataclass
class ReplicaStatus(Message):
    """What the agent knows of one replica process, sent in every heartbeat."""

    replica_id: int = field(metadata=limits(minimum=1))
    state: str = field(metadata=limits(max_chars=16))
    port: int | None = field(default=None, metadata=limits(minimum=0, maximum=65_535))
    error: str = ""
    in_flight: int = 0  # at the moment of the heartbeat, queued requests included
    queue_depth: int = 0  # of those, waiting for a batch
    mean_in_flight: float | None = None  # averaged since the previous heartbeat
    completed: int = 0
    failed: int = 0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    # When its process started (wall clock, epoch s; None: not started) and how many
    # times the agent started it again under this id.
    started_at_s: float | None = None
    restarts: int = field(default=0, metadata=limits(minimum=0, maximum=INT32_MAX))
    # Its output since the previous heartbeat that got through (serving/agent/logs.py):
    # controls escaped, lines cut; the portal keeps a bounded ring (serving/replica_logs.py).
    log_lines: list[str] = field(default_factory=list, metadata=limits(
        max_items=MAX_LOG_LINES, item_max_chars=MAX_LOG_LINE_CHARS))
    # A generative replica's engine (serving/replica/generation_engine.py); None: not
    # generative, or an agent or replica too old to say. Sequences at the moment of the
    # heartbeat; the KV cache's reserved share of its budget; generated tokens per second
    # since the previous heartbeat; percentiles over the replica's last 60 s.
    running_sequences: int | None = field(default=None,
                                          metadata=limits(minimum=0, maximum=INT32_MAX))
    waiting_sequences: int | None = field(default=None,
                                          metadata=limits(minimum=0, maximum=INT32_MAX))
    kv_cache_usage: float | None = field(default=None, metadata=limits(minimum=0, maximum=1))
    tokens_per_s: float | None = field(default=None, metadata=limits(minimum=0))
    ttft_p50_ms: float | None = field(default=None, metadata=limits(minimum=0))
    ttft_p99_ms: float | None = field(default=None, metadata=limits(minimum=0))
    itl_p50_ms: float | None = field(default=None, metadata=limits(minimum=0))
    itl_p99_ms: float | None = field(default=None, metadata=limits(minimum=0))
    queue_p50_ms: float | None = field(default=None, metadata=limits(minimum=0))


# ReplicaStatus's generation figures: the portal keeps only those a heartbeat gave.
GENERATION_FIELDS = ("running_sequences", "waiting_sequences", "kv_cache_usage",
                     "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
                     "queue_p50_ms")


@dataclass
class HeartbeatRequest(Message):
    devices: list[DeviceInfo] = field(metadata=limits(max_items=256))
    replicas: list[ReplicaStatus]
    cached_artifacts: list[str] = field(default_factory=list,
                                        metadata=limits(item_max_chars=128))
    # Renewal: a CSR for the node's current key, sent while its certificate nears expiry.
    csr_pem: str = field(default="", metadata=limits(max_chars=8192))


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
    # The version's processing steps (swarm_protocol/steps.py, labels included); {}: none.
    steps: dict[str, Any] = field(default_factory=dict)


@dataclass
class HeartbeatResponse(Message):
    desired: list[DesiredReplica]
    replica_key: str
    heartbeat_interval_s: float
    node_status: str = "ready"
    # Tunnel mode: the key the agent shows gateways, and their tunnel URLs (ws:// or wss://).
    reach_mode: str = field(default="direct", metadata=limits(max_chars=8))
    tunnel_key: str = field(default="", metadata=limits(max_chars=128))
    tunnel_urls: list[str] = field(default_factory=list, metadata=limits(
        max_items=64, item_max_chars=200))
    certificate_pem: str = ""  # the renewed certificate, when the request carried a CSR
