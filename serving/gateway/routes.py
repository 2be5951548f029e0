"""The gateway's in-memory routing table (pure dataclasses: no Django, no I/O).

The portal builds a RouteTable from the database (serving/gateway_source.py) and the
gateway swaps it in whole when it changes; the request path only reads it. Tests and
benchmarks build tables by hand or from JSON (`RouteTable.from_dict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ReplicaRoute:
    """A ready (or draining) replica the gateway may send requests to."""

    replica_id: int
    host: str
    port: int
    replica_key: str  # sent as `Authorization: Bearer <key>`; clients never see it
    version: int
    draining: bool = False
    node_id: int = 0
    tunnel: bool = False  # reached through the node's tunnel (serving/gateway/tunnel.py)
    # sha256 (hex) of the node certificate's public key (SPKI): TLS, pinned to it
    # (serving/gateway/node_tls.py).
    # "": plain HTTP (loopback nodes only).
    tls_sha256: str = ""


@dataclass(frozen=True)
class VersionInfo:
    """What model metadata says about one served version."""

    platform: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]


@dataclass(frozen=True)
class DeploymentRoute:
    """One endpoint (/v2/models/{name}) and how to balance it."""

    name: str
    deployment_id: int
    weights: dict[int, float]  # version -> traffic weight (a canary split); >0 is served
    versions: dict[int, VersionInfo]  # every version with replicas or weight
    replicas: tuple[ReplicaRoute, ...] = ()
    policy: str = "p2c_ewma"  # serving.balancing.Policy value
    max_in_flight_per_replica: int = 64
    queue_limit: int = 256  # requests that may wait at the gateway when all are at cap
    queue_timeout_s: float = 5.0
    request_timeout_s: float = 30.0
    max_attempts: int = 3
    # > 0: at zero replicas, hold requests this long while the auto-scaler starts one.
    hold_timeout_s: float = 0.0
    # > 0: generate requests whose prompts share their first this many characters go to
    # one replica while its load allows (serving/affinity.py); 0: off.
    prefix_affinity_chars: int = 0


@dataclass(frozen=True)
class ApiKeyRoute:
    """An API key, by the sha256 hex digest of its secret."""

    key_id: int
    digest: str
    deployments: frozenset[str] | None  # None: every deployment
    expires_at_s: float | None  # unix time
    rate_limit_rps: float | None  # None: unlimited
    burst: int = 0  # bucket size; 0 means max(1, rate_limit_rps)
    # Tokens of generative answers per minute (serving/gateway/ratelimit.py); None: unlimited.
    tokens_per_minute: int | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ApiKeyRoute:
        """Return a key from its JSON form; ValueError when `tokens_per_minute` is not a
        positive integer (a portal older than the field leaves it out: unlimited)."""
        scope = raw.get("deployments")
        return cls(**{**raw, "deployments": None if scope is None else frozenset(scope),
                      "tokens_per_minute": _tokens_per_minute(raw.get("tokens_per_minute"))})


def _tokens_per_minute(value: object) -> int | None:
    # Refused rather than read as "unlimited": the gateway then keeps its last good table.
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"tokens_per_minute must be a positive integer, not {value!r:.40}")
    return value


@dataclass(frozen=True)
class RouteTable:
    """Everything the gateway needs to route and authorise a request."""

    revision: str
    deployments: dict[str, DeploymentRoute] = field(default_factory=dict)
    api_keys: dict[str, ApiKeyRoute] = field(default_factory=dict)  # by digest
    # node id -> sha256 hex of its tunnel key, for the nodes that serve through a tunnel
    tunnels: dict[int, str] = field(default_factory=dict)
    node_ca_pem: str = ""  # the portal's node CA (PEM): the only issuer replicas may show

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        for key in raw["api_keys"].values():
            if key["deployments"] is not None:
                key["deployments"] = sorted(key["deployments"])
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RouteTable:
        deployments = {}
        for name, d in raw.get("deployments", {}).items():
            deployments[name] = DeploymentRoute(**{
                **d,
                "weights": {int(v): float(w) for v, w in d["weights"].items()},
                "versions": {int(v): VersionInfo(**info) for v, info in d["versions"].items()},
                "replicas": tuple(ReplicaRoute(**r) for r in d.get("replicas", ())),
            })
        keys = {}
        for digest, k in raw.get("api_keys", {}).items():
            keys[digest] = ApiKeyRoute.from_dict(k)
        tunnels = {int(node): str(digest) for node, digest in raw.get("tunnels", {}).items()}
        return cls(revision=str(raw.get("revision", "")), deployments=deployments,
                   api_keys=keys, tunnels=tunnels, node_ca_pem=str(raw.get("node_ca_pem", "")))


class TableSource(Protocol):
    """Where the gateway gets its table: the database in the portal, a file in tests."""

    async def revision(self) -> str:
        """Return a cheap token that changes whenever the table would change."""

    async def load(self) -> RouteTable:
        """Return the whole current table (may take a few database queries)."""


class SessionAuth(Protocol):
    """Checks a portal session cookie (logged-in users may call deployments)."""

    async def allows(self, session_key: str, deployment: str) -> bool:
        """Return whether the session belongs to an active user allowed to call it."""
