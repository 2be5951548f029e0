"""GPU servers (nodes), their devices, join tokens, deployments and replicas.

Only changes of state are written here (a node going offline, a replica becoming
ready); the per-second figures of heartbeats live in the cache (serving.live).
"""

from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

from registry.models import Model, ModelVersion


class JoinToken(models.Model):
    """A secret that lets a GPU server join the pool; stored as a sha256 digest."""

    name = models.CharField(max_length=100)
    token_hash = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=12, help_text="first characters, to recognise it")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT,
                                   related_name="join_tokens")
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    uses_left = models.PositiveIntegerField(null=True, blank=True, help_text="empty: unlimited")
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def status(self) -> str:
        """Return "valid", or the first reason it no longer lets a node join."""
        return credential_status(self.revoked_at, self.expires_at, self.uses_left)


def credential_status(revoked_at: datetime | None, expires_at: datetime | None,
                      uses_left: int | None = None) -> str:
    """Return revoked, expired, used up or valid (revoked wins, then expired)."""
    if revoked_at is not None:
        return "revoked"
    if expires_at is not None and expires_at <= timezone.now():
        return "expired"
    if uses_left is not None and uses_left <= 0:
        return "used up"
    return "valid"


class NodeStatus(models.TextChoices):
    READY = "ready", "ready"
    DRAINING = "draining", "draining"
    OFFLINE = "offline", "offline"


class Node(models.Model):
    """A machine running the worker agent."""

    name = models.CharField(max_length=100)
    address = models.CharField(max_length=255, help_text="host the gateway reaches replicas on")
    labels = models.JSONField(default=dict, blank=True)
    cost_per_hour = models.FloatField(default=0.0)
    status = models.CharField(max_length=16, choices=NodeStatus.choices,
                              default=NodeStatus.READY)
    secret_hash = models.CharField(max_length=64)
    agent_version = models.CharField(max_length=50, blank=True)
    cached_artifacts = models.JSONField(default=list, blank=True)
    join_token = models.ForeignKey(JoinToken, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="nodes")
    registered_at = models.DateTimeField(auto_now_add=True)
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    status_changed_at = models.DateTimeField(auto_now_add=True)
    # The TLS certificate the portal's CA issued at its join (serving/node_ca.py); empty: a
    # loopback node serving plain HTTP. Gateways pin replicas to this fingerprint.
    cert_sha256 = models.CharField(
        max_length=64, blank=True,
        help_text="sha256 of the node certificate's public key (SPKI, DER), hex")
    cert_serial = models.CharField(max_length=40, blank=True, help_text="hex")
    cert_expires_at = models.DateTimeField(null=True, blank=True)
    # How gateways reach its replicas (serving/services/reachability.py): `direct`, or
    # `tunnel` when the portal could not reach it at join (or it asked).
    reach_mode = models.CharField(max_length=8, default="direct",
                                  choices=[("direct", "direct"), ("tunnel", "tunnel")])

    class Meta:
        ordering = ["name", "id"]

    def __str__(self) -> str:
        return f"{self.name} (#{self.pk})"


class NodeAuthority(models.Model):
    """The certificate authority that signs node certificates: one row (pk 1).

    The private key is stored encrypted under a key derived from SECRET_KEY (serving/node_ca.py):
    every portal instance shares it through the database, and a database dump alone cannot
    sign certificates.
    """

    certificate_pem = models.TextField()
    encrypted_key = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"node CA #{self.pk}"


class Gpu(models.Model):
    """A device of a node: a GPU, or the CPU on a node without one. Live figures: cache."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="gpus")
    index = models.PositiveIntegerField()
    kind = models.CharField(max_length=8, default="gpu")
    uuid = models.CharField(max_length=100)
    name = models.CharField(max_length=200)
    memory_total_bytes = models.BigIntegerField()

    class Meta:
        ordering = ["node", "index"]
        constraints = [models.UniqueConstraint(fields=["node", "index"], name="unique_gpu_index")]

    def __str__(self) -> str:
        return f"{self.node.name}/{self.index} {self.name}"


class DevicePreference(models.TextChoices):
    AUTO = "auto", "GPU when available, else CPU"
    GPU = "gpu", "GPU only"
    CPU = "cpu", "CPU only"


class BalancingPolicy(models.TextChoices):
    P2C_EWMA = "p2c_ewma", "power of two choices, EWMA latency"
    LEAST_OUTSTANDING = "least_outstanding", "least outstanding requests"
    ROUND_ROBIN = "round_robin", "round robin"


class Deployment(models.Model):
    """A model endpoint served by N replicas, pinned to a version or following an alias.

    `version` is the primary version; `traffic` ({"<version number>": weight}) splits
    requests over several versions for a canary, and is {} when all go to `version`.
    """

    name = models.SlugField(max_length=100, unique=True, help_text="endpoint name under /v2")
    model = models.ForeignKey(Model, on_delete=models.PROTECT, related_name="deployments")
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT,
                                related_name="deployments")
    alias_name = models.CharField(max_length=63, blank=True,
                                  help_text="follow this registry alias when set")
    replicas = models.PositiveIntegerField(default=1, help_text="desired replica count")
    max_batch_size = models.PositiveIntegerField(default=8)
    max_queue_delay_ms = models.FloatField(default=2.0)
    device = models.CharField(max_length=8, choices=DevicePreference.choices,
                              default=DevicePreference.AUTO)
    memory_bytes = models.BigIntegerField(default=512 * 1024**2,
                                          help_text="device memory one replica needs")
    threads = models.PositiveIntegerField(default=1)
    traffic = models.JSONField(default=dict, blank=True,
                               help_text='canary split {"<version>": weight}; {}: all to version')
    policy = models.CharField(max_length=24, choices=BalancingPolicy.choices,
                              default=BalancingPolicy.P2C_EWMA)
    max_in_flight_per_replica = models.PositiveIntegerField(default=64)
    queue_limit = models.PositiveIntegerField(default=256)
    request_timeout_s = models.FloatField(default=30.0)
    # Generative deployments: requests whose prompts share their first N characters go to
    # one replica unless it is overloaded (serving/affinity.py); 0: off. Worth it only with
    # an engine that caches prefixes (vLLM's): ours keeps no cache between requests.
    prefix_affinity_chars = models.PositiveIntegerField(default=0)
    deleting = models.BooleanField(default=False, help_text="replicas drain, then it goes")
    # Set by the auto-scaler's policy (scaling app): at zero replicas the gateway holds
    # requests while a replica starts, instead of answering 503 at once.
    hold_at_zero = models.BooleanField(default=False)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT,
                                   related_name="deployments")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ReplicaState(models.TextChoices):
    PENDING = "pending", "pending (no node with room)"
    STARTING = "starting", "starting"
    READY = "ready", "ready"
    DRAINING = "draining", "draining"
    FAILED = "failed", "failed"
    STOPPED = "stopped", "stopped"


ACTIVE_REPLICA_STATES = (ReplicaState.PENDING, ReplicaState.STARTING, ReplicaState.READY)


class Replica(models.Model):
    """One replica process of a deployment on a node."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE,
                                   related_name="replica_set")
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    node = models.ForeignKey(Node, null=True, blank=True, on_delete=models.SET_NULL,
                             related_name="replicas")
    gpu_index = models.IntegerField(null=True, blank=True, help_text="empty: the CPU")
    port = models.PositiveIntegerField(null=True, blank=True)
    state = models.CharField(max_length=16, choices=ReplicaState.choices,
                             default=ReplicaState.PENDING)
    desired = models.BooleanField(default=True, help_text="false: being drained and removed")
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    state_changed_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["deployment", "id"]
        indexes = [models.Index(fields=["node", "desired"]),
                   models.Index(fields=["deployment", "state"])]

    def __str__(self) -> str:
        return f"{self.deployment.name}#{self.pk} on {self.node_id} ({self.state})"

    @property
    def device(self) -> str:
        return "cpu" if self.gpu_index is None else f"cuda:{self.gpu_index}"


class DeploymentRevision(models.Model):
    """An immutable snapshot of a deployment's versions, weights and settings."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE,
                                   related_name="revisions")
    number = models.PositiveIntegerField()
    spec = models.JSONField(help_text="the deployment's settings at this revision")
    reason = models.CharField(max_length=200, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                   on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["deployment", "-number"]
        constraints = [models.UniqueConstraint(fields=["deployment", "number"],
                                               name="unique_revision_number")]

    def __str__(self) -> str:
        return f"{self.deployment.name} r{self.number}"


MAX_TOKENS_PER_MINUTE = 10**9  # an API key's token rate limit at most


class ApiKey(models.Model):
    """A client key for /v2, scoped to deployments; stored as a sha256 digest."""

    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=12)
    key_hash = models.CharField(max_length=64, unique=True)
    deployments = models.ManyToManyField(Deployment, blank=True, related_name="api_keys")
    all_deployments = models.BooleanField(default=False)
    rate_limit_rps = models.FloatField(null=True, blank=True, help_text="empty: unlimited")
    burst = models.PositiveIntegerField(default=0)
    # Tokens of generative answers per minute (the gateway counts them), per gateway process.
    rate_limit_tokens_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="empty: unlimited",
        validators=[MinValueValidator(1), MaxValueValidator(MAX_TOKENS_PER_MINUTE)])
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT,
                                   related_name="api_keys")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(
        null=True, blank=True, help_text="when a gateway last admitted it (to the minute)")

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def status(self) -> str:
        """Return "valid", or why gateways refuse it: revoked or expired."""
        return credential_status(self.revoked_at, self.expires_at)


class GatewayToken(models.Model):
    """A secret a `swarm-gateway` process presents to read the routing table; stored as a
    sha256 digest, shown once."""

    name = models.CharField(max_length=100)
    token_hash = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=12, help_text="first characters, to recognise it")
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def status(self) -> str:
        """Return "valid" or "revoked"."""
        return credential_status(self.revoked_at, None)
