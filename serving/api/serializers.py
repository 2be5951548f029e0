"""Serving REST shapes: nodes (with live figures), join tokens, deployments, replicas."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from serving.models import (
    MAX_TOKENS_PER_MINUTE,
    ApiKey,
    BalancingPolicy,
    Deployment,
    DeploymentRevision,
    DevicePreference,
    Gpu,
    JoinToken,
    Node,
    Replica,
)
from swarm_portal.api import StrictModelSerializer, StrictSerializer

MAX_VERSION = 2**31 - 1  # the database's integer column
MAX_MEMORY_BYTES = 2**50  # a petabyte: far beyond any GPU, well inside a bigint


class GpuSerializer(serializers.ModelSerializer):
    class Meta:
        model = Gpu
        fields = ["index", "kind", "uuid", "name", "memory_total_bytes"]


class LiveDeviceSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    kind = serializers.CharField()
    name = serializers.CharField()
    memory_total_bytes = serializers.IntegerField()
    memory_used_bytes = serializers.IntegerField()
    utilization_pct = serializers.FloatField()
    temperature_c = serializers.FloatField(allow_null=True)
    power_w = serializers.FloatField(allow_null=True)


class NodeSerializer(serializers.ModelSerializer):
    gpus = GpuSerializer(many=True, read_only=True)
    live_devices = serializers.SerializerMethodField()
    last_seen_s = serializers.SerializerMethodField()

    class Meta:
        model = Node
        fields = ["id", "name", "address", "labels", "cost_per_hour", "status", "agent_version",
                  "registered_at", "last_heartbeat_at", "status_changed_at", "gpus",
                  "live_devices", "last_seen_s", "cached_artifacts"]
        read_only_fields = fields

    def _figures(self, node: Node) -> dict[str, Any]:
        return self.context.get("figures", {}).get(node.pk, {})

    @extend_schema_field(LiveDeviceSerializer(many=True))
    def get_live_devices(self, node: Node) -> list[dict[str, Any]]:
        return self._figures(node).get("devices", [])

    def get_last_seen_s(self, node: Node) -> float | None:
        return self._figures(node).get("at_s")


MAX_TOKEN_HOURS = 10 * 366 * 24  # ten years: beyond that, "never expires" says it better
MAX_USES = 1_000_000
MAX_RATE_RPS = 1_000_000.0
STATUS_HELP = "valid, or why it no longer works: expired, used up or revoked"


class JoinTokenSerializer(StrictModelSerializer):
    created_by = serializers.CharField(source="created_by.username", read_only=True)
    status = serializers.CharField(read_only=True, help_text=STATUS_HELP)
    expires_in_hours = serializers.FloatField(write_only=True, required=False, min_value=0.01,
                                              max_value=MAX_TOKEN_HOURS,
                                              help_text="lifetime; empty: never expires")
    uses = serializers.IntegerField(write_only=True, required=False, min_value=1,
                                    max_value=MAX_USES,
                                    help_text="how many nodes may join; empty: unlimited")

    class Meta:
        model = JoinToken
        fields = ["id", "name", "prefix", "created_by", "created_at", "expires_at", "uses_left",
                  "revoked_at", "status", "expires_in_hours", "uses"]
        read_only_fields = ["id", "prefix", "created_by", "created_at", "expires_at",
                            "uses_left", "revoked_at", "status"]


class JoinTokenCreatedSerializer(JoinTokenSerializer):
    token = serializers.CharField(read_only=True, help_text="the secret: shown only now")

    class Meta(JoinTokenSerializer.Meta):
        fields = [*JoinTokenSerializer.Meta.fields, "token"]


class ReplicaSerializer(serializers.ModelSerializer):
    """A replica row; the live facts (null: unknown) come from its node's last heartbeat
    and its output (context["facts"], serving.replica_logs.replica_facts)."""

    deployment = serializers.CharField(source="deployment.name")
    version = serializers.IntegerField(source="version.number")
    node_name = serializers.CharField(source="node.name", allow_null=True, default=None)
    uptime_s = serializers.SerializerMethodField(help_text="seconds since its process started")
    restarts = serializers.SerializerMethodField(
        help_text="times its agent started it again under this id")
    in_flight = serializers.SerializerMethodField(help_text="requests in it, queued included")
    latency_p50_ms = serializers.SerializerMethodField(help_text="over its recent requests")
    last_error = serializers.SerializerMethodField(
        help_text="the last line of its output that reads as an error (untrusted text)")

    class Meta:
        model = Replica
        fields = ["id", "deployment", "version", "node", "node_name", "gpu_index", "port",
                  "state", "desired", "error", "created_at", "ready_at", "state_changed_at",
                  "uptime_s", "restarts", "in_flight", "latency_p50_ms", "last_error"]
        read_only_fields = fields

    def _fact(self, replica: Replica, name: str) -> Any:
        return self.context.get("facts", {}).get(replica.pk, {}).get(name)

    @extend_schema_field(serializers.FloatField(allow_null=True))
    def get_uptime_s(self, replica: Replica) -> float | None:
        return self._fact(replica, "uptime_s")

    @extend_schema_field(serializers.IntegerField(allow_null=True))
    def get_restarts(self, replica: Replica) -> int | None:
        return self._fact(replica, "restarts")

    @extend_schema_field(serializers.IntegerField(allow_null=True))
    def get_in_flight(self, replica: Replica) -> int | None:
        return self._fact(replica, "in_flight")

    @extend_schema_field(serializers.FloatField(allow_null=True))
    def get_latency_p50_ms(self, replica: Replica) -> float | None:
        return self._fact(replica, "latency_p50_ms")

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_last_error(self, replica: Replica) -> str | None:
        return self._fact(replica, "last_error")


class ReplicaLogLineSerializer(serializers.Serializer):
    seq = serializers.IntegerField(help_text="this line's number in the replica's output")
    at = serializers.DateTimeField(help_text="when the portal received it")
    text = serializers.CharField(help_text="untrusted text: controls escaped, cut at 1 KiB")


class ReplicaLogsSerializer(serializers.Serializer):
    lines = ReplicaLogLineSerializer(many=True)
    next = serializers.IntegerField(help_text="pass as `after` to read the lines after these")


class DeploymentSerializer(serializers.ModelSerializer):
    model = serializers.SlugRelatedField(slug_field="name", read_only=True)
    version = serializers.IntegerField(source="version.number", read_only=True)
    ready_replicas = serializers.IntegerField(read_only=True)

    class Meta:
        model = Deployment
        fields = ["name", "model", "version", "alias_name", "traffic", "replicas",
                  "ready_replicas", "max_batch_size", "max_queue_delay_ms", "device",
                  "memory_bytes", "threads", "policy", "max_in_flight_per_replica",
                  "queue_limit", "request_timeout_s", "prefix_affinity_chars", "deleting",
                  "created_at"]
        read_only_fields = fields


class DeploymentCreateSerializer(StrictSerializer):
    name = serializers.SlugField(max_length=100)
    model = serializers.SlugField(max_length=100)
    version = serializers.IntegerField(min_value=1, max_value=MAX_VERSION, required=False)
    alias = serializers.CharField(max_length=63, required=False, default="")
    replicas = serializers.IntegerField(min_value=0, max_value=256, default=1)
    max_batch_size = serializers.IntegerField(min_value=1, max_value=4096, default=8)
    max_queue_delay_ms = serializers.FloatField(min_value=0.0, max_value=10_000.0, default=2.0)
    device = serializers.ChoiceField(choices=DevicePreference.choices, default="auto")
    memory_bytes = serializers.IntegerField(min_value=1, max_value=MAX_MEMORY_BYTES,
                                            default=512 * 1024**2)
    threads = serializers.IntegerField(min_value=1, max_value=256, default=1)
    policy = serializers.ChoiceField(choices=BalancingPolicy.choices, default="p2c_ewma")
    max_in_flight_per_replica = serializers.IntegerField(min_value=1, max_value=100_000,
                                                         default=64)
    queue_limit = serializers.IntegerField(min_value=0, max_value=100_000, default=256)
    request_timeout_s = serializers.FloatField(min_value=0.01, max_value=3600.0, default=30.0)
    prefix_affinity_chars = serializers.IntegerField(
        min_value=0, max_value=100_000, default=0,
        help_text="generative deployments: prompts sharing their first N characters go to one "
                  "replica unless it is overloaded (for engines that cache prefixes); 0: off")


class DeploymentUpdateSerializer(StrictSerializer):
    """A partial change: versions, weights or settings (each change is a revision)."""

    version = serializers.IntegerField(min_value=1, max_value=MAX_VERSION, required=False)
    alias = serializers.CharField(max_length=63, required=False, allow_blank=True)
    traffic = serializers.DictField(child=serializers.FloatField(min_value=0, max_value=1e6),
                                    required=False,
                                    help_text='canary split {"<version>": weight}; {}: none')
    replicas = serializers.IntegerField(min_value=0, max_value=256, required=False)
    max_batch_size = serializers.IntegerField(min_value=1, max_value=4096, required=False)
    max_queue_delay_ms = serializers.FloatField(min_value=0.0, max_value=10_000.0,
                                                required=False)
    policy = serializers.ChoiceField(choices=BalancingPolicy.choices, required=False)
    max_in_flight_per_replica = serializers.IntegerField(min_value=1, max_value=100_000,
                                                         required=False)
    queue_limit = serializers.IntegerField(min_value=0, max_value=100_000, required=False)
    request_timeout_s = serializers.FloatField(min_value=0.01, max_value=3600.0,
                                               required=False)
    prefix_affinity_chars = serializers.IntegerField(min_value=0, max_value=100_000,
                                                     required=False)


class RevisionSerializer(serializers.ModelSerializer):
    created_by = serializers.CharField(source="created_by.username", allow_null=True,
                                       default=None)

    class Meta:
        model = DeploymentRevision
        fields = ["number", "spec", "reason", "created_by", "created_at"]
        read_only_fields = fields


class RollbackSerializer(StrictSerializer):
    revision = serializers.IntegerField(min_value=1, max_value=MAX_VERSION)


class ApiKeySerializer(serializers.ModelSerializer):
    created_by = serializers.CharField(source="created_by.username", read_only=True)
    deployments = serializers.SlugRelatedField(slug_field="name", many=True, read_only=True)
    status = serializers.CharField(read_only=True, help_text=STATUS_HELP)

    class Meta:
        model = ApiKey
        fields = ["id", "name", "prefix", "deployments", "all_deployments", "rate_limit_rps",
                  "burst", "rate_limit_tokens_per_minute", "expires_at", "revoked_at", "status",
                  "created_by", "created_at", "last_used_at"]
        read_only_fields = fields


class ApiKeyCreateSerializer(StrictSerializer):
    name = serializers.CharField(max_length=100)
    deployments = serializers.ListField(child=serializers.SlugField(max_length=100),
                                        required=False, max_length=1000,
                                        help_text="names; leave out for every deployment")
    expires_in_hours = serializers.FloatField(min_value=0.0001, max_value=MAX_TOKEN_HOURS,
                                              required=False)
    rate_limit_rps = serializers.FloatField(min_value=0.001, max_value=MAX_RATE_RPS,
                                            required=False)
    burst = serializers.IntegerField(min_value=0, max_value=MAX_USES, default=0)
    rate_limit_tokens_per_minute = serializers.IntegerField(
        min_value=1, max_value=MAX_TOKENS_PER_MINUTE, required=False,
        help_text="tokens of generative answers per minute; leave out for no limit")


class ApiKeyCreatedSerializer(ApiKeySerializer):
    key = serializers.CharField(read_only=True, help_text="the secret: shown only now")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]
        read_only_fields = fields


class ScaleSerializer(StrictSerializer):
    replicas = serializers.IntegerField(min_value=0, max_value=256)
    pause_policy = serializers.BooleanField(
        default=False, help_text="under an enabled scaling policy: turn it off and scale "
                                 "(without it, the request is refused with 409)")
