"""Django admin for the registry; versions and the alias audit are read-only there."""

from __future__ import annotations

from django.contrib import admin

from registry.models import Alias, AliasMove, Model, ModelVersion


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Model)
class ModelAdmin(admin.ModelAdmin):
    list_display = ["name", "owner", "created_at"]
    search_fields = ["name", "description"]
    list_select_related = ["owner"]
    readonly_fields = ["created_at"]


@admin.register(ModelVersion)
class ModelVersionAdmin(ReadOnlyAdmin):
    """Immutable: uploads go through the portal or the API, which validate them."""

    list_display = ["model", "number", "format", "size_bytes", "sha256", "created_by", "created_at"]
    list_filter = ["format"]
    search_fields = ["model__name", "sha256"]
    list_select_related = ["model", "created_by"]

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Alias)
class AliasAdmin(ReadOnlyAdmin):
    """Moves go through the portal or the API so that every one is audited."""

    list_display = ["model", "name", "version", "updated_at"]
    list_select_related = ["model", "version"]


@admin.register(AliasMove)
class AliasMoveAdmin(ReadOnlyAdmin):
    list_display = ["model", "alias_name", "from_version", "to_version", "moved_by", "moved_at",
                    "is_rollback"]
    list_select_related = ["model", "from_version", "to_version", "moved_by"]

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
