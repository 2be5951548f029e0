"""Who may change the registry: staff and members of the `operators` group."""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import SAFE_METHODS, BasePermission

OPERATORS_GROUP = "operators"


def is_operator(user: Any) -> bool:
    """Return whether the user may upload versions and move aliases."""
    if not user or not user.is_authenticated or not user.is_active:
        return False
    return bool(user.is_staff or user.groups.filter(name=OPERATORS_GROUP).exists())


class IsOperatorOrReadOnly(BasePermission):
    """Any authenticated user reads; only operators write."""

    message = "only staff or members of the operators group may change the registry"

    def has_permission(self, request: Any, view: Any) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        return request.method in SAFE_METHODS or is_operator(request.user)
