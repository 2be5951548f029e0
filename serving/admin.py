"""Django admin for nodes, devices, join tokens, deployments and replicas."""

from __future__ import annotations

from django.contrib import admin
from django.utils import timezone

from serving import services
from serving.models import (
    ApiKey,
    Deployment,
    DeploymentRevision,
    GatewayToken,
    Gpu,
    JoinToken,
    Node,
    Replica,
)


class GpuInline(admin.TabularInline):
    model = Gpu
    extra = 0
    can_delete = False
    readonly_fields = ["index", "kind", "uuid", "name", "memory_total_bytes"]


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = ["name", "address", "status", "cost_per_hour", "last_heartbeat_at"]
    list_filter = ["status"]
    search_fields = ["name", "address"]
    readonly_fields = ["secret_hash", "registered_at", "last_heartbeat_at", "status_changed_at",
                       "cached_artifacts", "join_token", "agent_version"]
    inlines = [GpuInline]
    actions = ["drain"]

    @admin.action(description="Drain the selected nodes")
    def drain(self, request, queryset) -> None:
        for node in queryset:
            services.do_drain_node(node)

    def delete_model(self, request, obj: Node) -> None:
        services.do_remove_node(obj)

    def delete_queryset(self, request, queryset) -> None:
        for node in queryset:
            services.do_remove_node(node)


@admin.register(JoinToken)
class JoinTokenAdmin(admin.ModelAdmin):
    """Tokens are created through the API or the portal, where the secret is shown once."""

    list_display = ["name", "prefix", "created_by", "expires_at", "uses_left", "revoked_at"]
    readonly_fields = ["token_hash", "prefix", "created_by", "created_at"]
    actions = ["revoke"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(description="Revoke the selected tokens")
    def revoke(self, request, queryset) -> None:
        for token in queryset:
            services.do_revoke_join_token(token)


@admin.register(Deployment)
class DeploymentAdmin(admin.ModelAdmin):
    list_display = ["name", "model", "version", "alias_name", "replicas", "deleting"]
    list_select_related = ["model", "version"]
    readonly_fields = ["deleting", "created_at", "created_by"]

    def save_model(self, request, obj: Deployment, form, change) -> None:
        if not change:
            obj.created_by = request.user
        super().save_model(request, obj, form, change)
        services.reconcile_deployment(obj.pk)

    def delete_model(self, request, obj: Deployment) -> None:
        services.do_delete_deployment(obj)


@admin.register(Replica)
class ReplicaAdmin(admin.ModelAdmin):
    list_display = ["id", "deployment", "version", "node", "gpu_index", "port", "state",
                    "desired"]
    list_filter = ["state", "desired"]
    list_select_related = ["deployment", "version", "node"]
    readonly_fields = [f.name for f in Replica._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys are created through the API or the portal, where the secret is shown once."""

    list_display = ["name", "prefix", "all_deployments", "rate_limit_rps", "expires_at",
                    "revoked_at"]
    readonly_fields = ["key_hash", "prefix", "created_by", "created_at"]
    actions = ["revoke"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request, queryset) -> None:
        for key in queryset:
            services.do_revoke_api_key(key)


@admin.register(DeploymentRevision)
class DeploymentRevisionAdmin(admin.ModelAdmin):
    list_display = ["deployment", "number", "reason", "created_by", "created_at"]
    list_select_related = ["deployment", "created_by"]
    readonly_fields = ["deployment", "number", "spec", "reason", "created_by", "created_at"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(GatewayToken)
class GatewayTokenAdmin(admin.ModelAdmin):
    """Tokens are created with `manage.py create_gateway_token`, which shows the secret once."""

    list_display = ["name", "prefix", "created_at", "revoked_at"]
    readonly_fields = ["name", "token_hash", "prefix", "created_at", "revoked_at"]
    actions = ["revoke"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(description="Revoke the selected tokens")
    def revoke(self, request, queryset) -> None:
        queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
